"""The one way a config becomes a model: device, weight dtype, quantisation.

`train`, `cache`, `validate`, the benchmark and the nodes all call `prepare_model`, so they load the
same weights in the same dtype with the same quantisation, and therefore compute the same component
ids: a cache filled by any of them is reused by every other one with the same settings.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ConfigError
from ..plan.placement import load_placed
from ..quantize import quantize_model
from .base import ModelBundle

# mixed_precision -> the dtype weights are loaded in and the loop computes in. "fp16" is refused at
# config time (config.py): Flux/HiDream activations overflow fp16's range (see README).
WEIGHT_DTYPES = {"bf16": torch.bfloat16, "no": torch.float32}


def weight_dtype(cfg: Any) -> torch.dtype:
    """The dtype `mixed_precision` names (bf16 unless "no")."""
    name = getattr(cfg, "mixed_precision", None) or "bf16"
    if name not in WEIGHT_DTYPES:
        raise ConfigError(
            f"{getattr(cfg, 'source', 'config')}: key 'mixed_precision': '{name}' cannot be used; "
            f"choose {' or '.join(WEIGHT_DTYPES)}"
        )
    return WEIGHT_DTYPES[name]


def default_device() -> torch.device:
    """Where a single-process command computes: the GPU when there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def prepare_model(cfg: Any, device: torch.device | str | None = None) -> ModelBundle:
    """Load the model `cfg` names on `device` (default: `default_device()`) in `weight_dtype(cfg)`,
    then quantise it as base_model_precision / text_encoder_N_precision say."""
    device = torch.device(device) if device is not None else default_device()
    model = load_placed(cfg, device, weight_dtype(cfg))  # via host RAM for offload / quantize_via cpu
    return quantize_model(model, cfg)
