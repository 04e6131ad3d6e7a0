"""Regularisation datasets (`is_regularisation_data: true`), as SimpleTuner trains them for LoRA and
LyCORIS: the target of a regularisation image is not the flow-matching target (noise - x0) but the
base model's own prediction for the same noisy input, timestep and prompt, computed with the adapter
disabled and without gradient (SimpleTuner's "parent" prediction, trainer.py
`_prepare_regularisation_parent_targets`). The adapter is thereby pulled towards leaving the base
model's behaviour on those images unchanged (prior preservation without a second model copy).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch


def regularisation_rows(batch: dict[str, Any], device: torch.device) -> torch.Tensor | None:
    """A [B] bool mask of the batch's regularisation rows, or None when there are none."""
    flags = batch.get("is_regularisation_data")
    if not flags or not any(flags):
        return None
    return torch.tensor([bool(f) for f in flags], device=device)


@torch.no_grad()
def parent_targets(
    adapter: Any,
    predict: Callable[[], torch.Tensor],
    target: torch.Tensor,
    rows: torch.Tensor,
    autocast: contextlib.AbstractContextManager,
) -> torch.Tensor:
    """`target` with the regularisation rows replaced by `predict()` run with the adapter disabled."""
    with adapter.disabled(), autocast:
        parent = predict().float()
    return torch.where(rows.reshape(-1, *([1] * (target.ndim - 1))), parent, target)
