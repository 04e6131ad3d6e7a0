"""The final adapter file: safetensors tensors plus string metadata that ComfyUI, diffusers and we read.

Metadata keys we write (all values are strings, as safetensors requires):
  format            "pt" (diffusers checks it)
  tunegraph_format  "1"
  adapter_kind      "lycoris" | "lora"
  adapter_config    JSON of the adapter's config (Adapter.config)
  family, flavour, base_precision, step, config_hash   (from the caller; see run_metadata)
  lycoris_config    JSON (LyCORIS only; SimpleTuner's key)
  ss_network_module / ss_network_dim / ss_network_alpha / ss_network_args   (LyCORIS, kohya-style)
  lora_adapter_metadata   JSON of the PEFT LoraConfig with `transformer.` keys (LoRA; diffusers' key)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import TrainingError

FORMAT_VERSION = "1"


def run_metadata(
    cfg: Any, step: int, config_hash: str | None = None, base_precision: str | None = None
) -> dict[str, str]:
    """The run facts every exported file carries: family, flavour, base precision (as quantised, else
    as the config says), step, config hash."""
    return {
        "family": str(getattr(cfg, "model_family", None) or ""),
        "flavour": str(getattr(cfg, "model_flavour", None) or ""),
        "base_precision": base_precision or str(getattr(cfg, "base_model_precision", None) or "no_change"),
        "step": str(int(step)),
        "config_hash": config_hash if config_hash is not None else _hash_of(cfg),
    }


def _hash_of(cfg: Any) -> str:
    fn = getattr(cfg, "config_hash", None)
    return str(fn()) if callable(fn) else ""


def stringify(metadata: dict[str, Any]) -> dict[str, str]:
    """safetensors metadata must be str -> str; dicts and lists become JSON."""
    out = {}
    for key, value in metadata.items():
        if value is None:
            continue
        out[str(key)] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return out


def write_adapter_file(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> Path:
    """Write tensors + metadata atomically (temp file, then rename); refuses an empty adapter."""
    path = Path(path)
    if not tensors:
        raise TrainingError(
            f"{path}: refusing to write an adapter file with no tensors (adapter not attached?)"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    save_file(
        clean, str(tmp), metadata=stringify({"format": "pt", "tunegraph_format": FORMAT_VERSION, **metadata})
    )
    os.replace(tmp, path)
    return path


def read_adapter_metadata(path: str | Path) -> dict[str, str]:
    """The safetensors metadata of an adapter file (empty dict when it has none)."""
    path = Path(path)
    if not path.is_file():
        raise TrainingError(f"adapter file '{path}' does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise TrainingError(f"{path}: not a readable safetensors file ({e})") from None


def read_adapter_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    read_adapter_metadata(path)  # existence and format check with a clear error
    return load_file(str(path))
