"""`tunegraph tiny-models`: write the built-in tiny models as diffusers folders, and with `--comfyui DIR`
also in the form a ComfyUI installation loads.

The folders load with `pretrained_model_name_or_path` like a downloaded model (and with plain
diffusers' `FluxPipeline.from_pretrained`), so tests, demos and workflows can use a path.

`--comfyui DIR` writes, for each family:
  DIR/models/diffusion_models/tunegraph-tiny-<family>.safetensors  the transformer in ComfyUI's keys
      (Flux: BFL layout) with the explicit shape in its metadata (ComfyUI's detection assumes
      full-size shapes), for the TuneGraphLoadDiffusionModel node;
  DIR/models/diffusers/tunegraph-tiny-<family>/  the diffusers folder (text encoders, VAE) for
      LoadTrainingModel's diffusers_folder, so prompts and decoding use the same tiny model.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import ConfigError
from ..models import ModelSource, get_family
from ..models.comfy_keys import UNET_CONFIG_KEY, to_comfy_keys, unet_config


def write_tiny_models(out_dir: Path, families: Iterable[str] = ("flux",), seed: int = 0) -> dict[str, Path]:
    """Write `out_dir/<family>/` for each family; returns {family: folder}."""
    out_dir = Path(out_dir)
    written = {}
    for name in families:
        family = get_family(name)
        model = family.load(ModelSource(flavour="tiny", seed=seed), device="cpu", dtype=torch.float32)
        written[family.family] = model.save_pretrained(out_dir / family.family)
    return written


def comfy_file_name(family: str) -> str:
    return f"tunegraph-tiny-{family}.safetensors"


def write_comfyui_models(
    comfy_dir: Path, families: Iterable[str] = ("flux",), seed: int = 0
) -> dict[str, str]:
    """Write the tiny models into a ComfyUI installation's model folders (see the module docstring).
    Returns {"<family>": diffusion-model file, "<family>_diffusers": folder}."""
    models = Path(comfy_dir) / "models"
    if not Path(comfy_dir).is_dir():
        raise ConfigError(f"--comfyui {comfy_dir}: no such folder (give the ComfyUI folder holding models/)")
    out: dict[str, str] = {}
    for name in families:
        family = get_family(name)
        model = family.load(ModelSource(flavour="tiny", seed=seed), device="cpu", dtype=torch.float32)
        folder = model.save_pretrained(models / "diffusers" / f"tunegraph-tiny-{family.family}")
        sd = {k: v.detach().contiguous() for k, v in model.transformer.state_dict().items()}
        meta = {UNET_CONFIG_KEY: json.dumps(unet_config(family.family, model.transformer)),
                "family": family.family, "flavour": "tiny", "seed": str(seed)}  # fmt: skip
        path = models / "diffusion_models" / comfy_file_name(family.family)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.contiguous() for k, v in to_comfy_keys(family.family, sd).items()}
        save_file(tensors, str(path), metadata=meta)
        out[family.family], out[f"{family.family}_diffusers"] = str(path), str(folder)
    return out
