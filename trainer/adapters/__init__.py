"""Adapters a run trains: LyCORIS (LoKr) and PEFT LoRA, their export files and checkpoint state."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ConfigError
from .base import Adapter
from .export import adapter_meta, export_state, load_adapter_file, load_adapter_state, save_adapter_state
from .files import read_adapter_metadata, run_metadata
from .lora import build_lora_adapter
from .lycoris import build_lycoris_adapter

__all__ = [
    "Adapter",
    "adapter_meta",
    "attach_adapter",
    "export_state",
    "load_adapter_file",
    "load_adapter_state",
    "read_adapter_metadata",
    "run_metadata",
    "save_adapter_state",
]


def attach_adapter(transformer: torch.nn.Module, cfg: Any, family_info: Any = None) -> Adapter:
    """Freeze `transformer` and wrap its target modules as `cfg.lora_type` says; only adapter
    parameters require grad afterwards."""
    lora_type = (cfg.lora_type or "standard").lower()
    if lora_type == "lycoris":
        return build_lycoris_adapter(transformer, cfg, family_info)
    if lora_type == "standard":
        return build_lora_adapter(transformer, cfg, family_info)
    raise ConfigError(f"{cfg.source}: lora_type '{cfg.lora_type}' is not one of standard, lycoris")
