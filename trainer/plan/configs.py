"""Full-size transformer configs (the published diffusers `transformer/config.json` values, shipped in
trainer/models/configs/), so a plan needs no model files: the fake-tensor forward builds the model from these."""

from __future__ import annotations

from typing import Any


def full_size_config(family: str, flavour: str) -> dict[str, Any]:
    """The shipped full-size transformer config (trainer/models/configs/, the one single-file loading
    uses) as constructor kwargs."""
    from ..models.single_file import shipped_config

    name = {"flux": "flux-schnell" if flavour == "schnell" else "flux-dev"}.get(family, "hidream-i1")
    return {k: v for k, v in shipped_config(name).items() if not k.startswith("_")}


def text_tokens(family: str, flavour: str) -> int:
    """The cached prompt length the transformer sees (models/flux.py, models/hidream.py)."""
    if family == "flux":
        return 256 if flavour == "schnell" else 512
    return 128
