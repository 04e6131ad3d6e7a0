"""Gradient checkpointing, optionally on every Nth transformer block only (SimpleTuner's
`gradient_checkpointing_interval`): fewer recomputed blocks trade memory for speed.

diffusers' Flux and HiDream transformers route each block of their block lists through
`self._gradient_checkpointing_func(block, *inputs)` when checkpointing is on. With an interval N
that function checkpoints block i of each list only when i % N == 0 (as SimpleTuner's transformers
do) and calls the others directly.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger("tunegraph")


def checkpointed_blocks(transformer: torch.nn.Module, interval: int) -> set[int]:
    """ids of the blocks to checkpoint: index % interval == 0 within every `*blocks` ModuleList."""
    return {
        id(block)
        for name, child in transformer.named_children()
        if isinstance(child, torch.nn.ModuleList) and name.endswith("blocks")
        for i, block in enumerate(child)
        if i % interval == 0
    }


def enable_checkpointing(transformer: torch.nn.Module, cfg: Any) -> None:
    """gradient_checkpointing on the transformer as `cfg` says (every block, or every Nth)."""
    interval = getattr(cfg, "gradient_checkpointing_interval", None)
    if not cfg.gradient_checkpointing:
        if interval:
            log.warning(
                "gradient_checkpointing_interval=%s has no effect: gradient_checkpointing is off", interval
            )
        return
    transformer.enable_gradient_checkpointing()
    if not interval or interval <= 1:
        return
    chosen = checkpointed_blocks(transformer, int(interval))
    full = transformer._gradient_checkpointing_func

    def every_nth(block: torch.nn.Module, *args: Any) -> Any:
        return full(block, *args) if id(block) in chosen else block(*args)

    transformer._gradient_checkpointing_func = every_nth
