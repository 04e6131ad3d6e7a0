"""Model families by config name. Adding a family: write its module, add one line to FAMILIES."""

from __future__ import annotations

from typing import Any

import torch

from ..config import did_you_mean
from ..errors import ConfigError
from .base import ModelBundle
from .flux import FluxModel
from .hidream import HiDreamModel
from .loading import ModelSource

FAMILIES: dict[str, type[ModelBundle]] = {
    "flux": FluxModel,
    "hidream": HiDreamModel,
}


def get_family(name: str) -> type[ModelBundle]:
    """The ModelBundle subclass for `model_family` `name`."""
    key = (name or "").strip().lower()
    if key not in FAMILIES:
        raise ConfigError(
            f"key 'model_family': '{name}' is not a supported model family{did_you_mean(key, list(FAMILIES))}; "
            f"choose one of {', '.join(FAMILIES)}"
        )
    return FAMILIES[key]


def load_model(
    cfg: Any, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> ModelBundle:
    """Load the model a TrainConfig names (model_family, model_flavour, pretrained_* keys, seed)."""
    family = get_family(getattr(cfg, "model_family", None) or "flux")
    return family.load(ModelSource.from_config(cfg), device=device, dtype=dtype)
