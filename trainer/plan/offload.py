"""Group offload of the frozen transformer while an adapter trains, through diffusers' own hooks.

`diffusers.hooks.apply_group_offloading` (SimpleTuner's `enable_group_offload` keys) moves groups
of blocks (or single leaf modules) to the device just before their forward and back after it.
Training needs nothing more: autograd saves the weights a backward pass reads as tensors of their
own (sharing the onloaded storage), so offloading a parameter after its forward does not change
its backward (tests/test_group_offload.py poisons offloaded weights to prove it). It also means
the saving needs gradient checkpointing: without it the backward keeps every block's onloaded
weights alive until it runs; with it only the block being recomputed holds them.

A quantised base offloads to host RAM (int8-quanto and int8-torchao train with equal numbers on
CPU); to disk it cannot (safetensors stores neither quanto nor torchao tensors): refused.

Adapters must stay outside the groups: LyCORIS keeps its own modules next to the transformer (so
it works, merged and bypass), PEFT LoRA puts its layers inside the blocks, where diffusers would
offload them as frozen weights (and write them to disk once): refused with a clear error.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..errors import ConfigError

log = logging.getLogger("tunegraph")


def check_offload(cfg: Any) -> None:
    if (cfg.lora_type or "standard").lower() != "lycoris":
        raise ConfigError(
            f"{cfg.source}: enable_group_offload trains LyCORIS adapters (lora_type lycoris); PEFT LoRA puts "
            "its trainable layers inside the offloaded blocks. Use lora_type lycoris or turn group offload off."
        )
    precision = (getattr(cfg, "base_model_precision", None) or "no_change").lower()
    if cfg.group_offload_to_disk_path and precision != "no_change":
        raise ConfigError(
            f"{cfg.source}: group_offload_to_disk_path cannot hold a quantised base ({precision}): safetensors "
            "does not store quanto/torchao tensors. Offload to host RAM (unset group_offload_to_disk_path)."
        )
    if cfg.group_offload_use_stream and not torch.cuda.is_available():
        raise ConfigError(
            f"{cfg.source}: group_offload_use_stream needs a CUDA device (streams); set it to false here"
        )


def apply_group_offload(transformer: torch.nn.Module, cfg: Any, device: torch.device | str) -> bool:
    """Apply diffusers' group offloading to the (frozen, adapter-wrapped) transformer as `cfg`
    says, made safe for the backward pass. Returns False when group offload is off."""
    if not getattr(cfg, "enable_group_offload", False):
        return False
    from diffusers.hooks import apply_group_offloading

    check_offload(cfg)
    device = torch.device(device)
    kind = cfg.group_offload_type or "block_level"
    apply_group_offloading(
        transformer,
        onload_device=device,
        offload_device=torch.device("cpu"),
        offload_type=kind,
        num_blocks_per_group=int(cfg.group_offload_blocks_per_group or 1) if kind == "block_level" else None,
        use_stream=bool(cfg.group_offload_use_stream),
        offload_to_disk_path=cfg.group_offload_to_disk_path or None,
    )
    if not cfg.gradient_checkpointing:
        log.warning(
            "group offload without gradient_checkpointing saves little: the backward keeps every block's "
            "weights on the device until it runs. Set gradient_checkpointing true."
        )
    log.info("group offload: %s onto %s", kind, device)
    return True
