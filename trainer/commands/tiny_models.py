"""`tunegraph tiny-models`: write the built-in tiny models as diffusers folders.

The folders load with `pretrained_model_name_or_path` like a downloaded model (and with plain
diffusers' `FluxPipeline.from_pretrained`), so tests, demos and workflows can use a path.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from ..models import ModelSource, get_family


def write_tiny_models(out_dir: Path, families: Iterable[str] = ("flux",), seed: int = 0) -> dict[str, Path]:
    """Write `out_dir/<family>/` for each family; returns {family: folder}."""
    out_dir = Path(out_dir)
    written = {}
    for name in families:
        family = get_family(name)
        model = family.load(ModelSource(flavour="tiny", seed=seed), device="cpu", dtype=torch.float32)
        written[family.family] = model.save_pretrained(out_dir / family.family)
    return written
