"""Group offload of the frozen transformer while an adapter trains, through diffusers' own hooks.

`diffusers.hooks.apply_group_offloading` (SimpleTuner's `enable_group_offload` keys) moves groups
of blocks (or single leaf modules) to the device just before their forward and back after it.
Training needs more: the backward reads frozen weights after the forward hook offloaded them
(leaf_level gives NaN in tests/test_group_offload.py, where offloaded weights are poisoned). So
every group also onloads on a backward pre-hook of its modules and is held there, its offload
skipped, while its backward runs; the previous group is released when the next one is taken, the
last one at the next forward. The saving needs gradient checkpointing: without it the backward
keeps every block's onloaded weights alive until it runs.

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


class _BackwardOnload:
    """Hold one group on the device during its backward pass."""

    def __init__(self) -> None:
        self.held: Any = None

    def take(self, group: Any) -> None:
        if self.held is group:
            return
        self.release()
        group.onload_()
        self.held = group

    def release(self, *_: Any) -> None:
        group, self.held = self.held, None
        if group is not None:
            group._tunegraph_offload()

    def guard(self, group: Any) -> None:
        """Replace the group's offload_ by one that waits while the group is held."""
        group._tunegraph_offload = group.offload_

        def offload_() -> None:
            if self.held is not group:
                group._tunegraph_offload()

        group.offload_ = offload_


def _groups(transformer: torch.nn.Module) -> list[Any]:
    found: dict[int, Any] = {}
    for m in transformer.modules():
        registry = getattr(m, "_diffusers_hook", None)
        hook = registry.get_hook("group_offloading") if registry is not None else None
        if hook is not None:
            found.setdefault(id(hook.group), hook.group)
    return list(found.values())


def _group_modules(group: Any, transformer: torch.nn.Module) -> list[torch.nn.Module]:
    """Modules whose backward needs the group's weights: its modules, or (the group of weights
    left outside any block) every module holding one of those weights."""
    if group.modules:
        return list(group.modules)
    ids = {id(p) for p in group.parameters}
    return [m for m in transformer.modules() if any(id(p) in ids for p in m.parameters(recurse=False))]


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
    holder = _BackwardOnload()
    for group in _groups(transformer):
        holder.guard(group)
        for module in _group_modules(group, transformer):
            module.register_full_backward_pre_hook(lambda m, g, group=group: holder.take(group))
    transformer.register_forward_pre_hook(lambda m, a: holder.release())
    transformer._tunegraph_backward_onload = holder
    if not cfg.gradient_checkpointing:
        log.warning(
            "group offload without gradient_checkpointing saves little: the backward keeps every block's "
            "weights on the device until it runs. Set gradient_checkpointing true."
        )
    log.info("group offload: %s onto %s", kind, device)
    return True
