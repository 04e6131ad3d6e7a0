"""HiDream's mixture-of-experts layer, as the training forward runs it, for fake tensors.

diffusers' training path sends token rows to experts with boolean masks (`x[idx == i]`,
`y[idx == i] = ...`): the row counts depend on the router's data, which fake tensors do not have.
Autograd keeps the same things whatever the routing: both masks of every expert (bool, one byte
per routed row) and each expert's own tensors, linear in its row count, whose sum over experts is
always tokens x top-k. So the replica hands every expert an even share of the rows and keeps the
masks through two small autograd functions; everything else is diffusers' own code path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


class _TakeRows(torch.autograd.Function):
    """`x[mask]` with a known row count: keeps the mask, as aten.index does."""

    @staticmethod
    def forward(ctx, x, mask, rows: int):
        ctx.save_for_backward(mask)
        return x.new_empty(rows, x.shape[-1])

    @staticmethod
    def backward(ctx, grad):  # pragma: no cover - fake tensors only measure the forward
        return None, None, None


class _PutRows(torch.autograd.Function):
    """`y[mask] = rows` in place: keeps the mask, as aten.index_put_ does."""

    @staticmethod
    def forward(ctx, y, mask, rows):
        ctx.save_for_backward(mask)
        ctx.mark_dirty(y)
        return y

    @staticmethod
    def backward(ctx, grad):  # pragma: no cover
        return None, None, None


def even_rows(total: int, experts: int) -> list[int]:
    base, extra = divmod(total, experts)
    return [base + (1 if i < extra else 0) for i in range(experts)]


def _forward(self, x: torch.Tensor) -> torch.Tensor:
    """MOEFeedForwardSwiGLU.forward in training mode (diffusers 0.42.1), routing by even shares."""
    wtype, identity, orig_shape = x.dtype, x, x.shape
    topk_idx, topk_weight, _ = self.gate(x)
    x = x.view(-1, x.shape[-1])
    flat_topk_idx = topk_idx.view(-1)
    x = x.repeat_interleave(self.num_activated_experts, dim=0)
    y = torch.empty_like(x, dtype=wtype)
    for i, (expert, rows) in enumerate(
        zip(self.experts, even_rows(x.shape[0], len(self.experts)), strict=True)
    ):
        out = expert(_TakeRows.apply(x, flat_topk_idx == i, rows)).to(dtype=wtype)
        y = _PutRows.apply(y, flat_topk_idx == i, out)
    y = (y.view(*topk_weight.shape, -1) * topk_weight.unsqueeze(-1)).sum(dim=1)
    y = y.view(*orig_shape).to(dtype=wtype)
    return y + self.shared_experts(identity)


@contextlib.contextmanager
def fake_routing(transformer: torch.nn.Module) -> Iterator[None]:
    """Every MoE layer of `transformer` runs the replica while inside."""
    layers = [m for m in transformer.modules() if type(m).__name__ == "MOEFeedForwardSwiGLU"]
    try:
        for m in layers:
            m.forward = _forward.__get__(m)
        yield
    finally:
        for m in layers:
            m.__dict__.pop("forward", None)
