"""Count the bytes autograd keeps for the backward pass: `torch.autograd.graph.saved_tensors_hooks`.

Every tensor an op saves for backward passes the pack hook. Bytes are counted per storage (views
and repeats of one buffer count once), only while some saved tensor of it is still alive (a graph
branch nobody uses, such as a discarded auxiliary loss, frees what it saved), and storages of
parameters and buffers are left out: the plan counts weights separately. With gradient checkpointing the checkpointed blocks save through
their own hooks (nothing reaches ours); what stays alive is each block's inputs, recorded by
wrapping the model's `_gradient_checkpointing_func`. The same counter runs on real tensors (the
tiny models, the proof) and on fake ones (full size, the plan).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from typing import Any

import torch


def _key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


class SavedBytes:
    """Storages saved during the forward, outside checkpointed blocks and as their inputs."""

    def __init__(self, module: torch.nn.Module):
        self.excluded = {_key(t) for t in [*module.parameters(), *module.buffers()]}
        self.saved: dict[int, tuple[int, list]] = {}  # storage -> (bytes, weak refs to its saved tensors)
        self.block_of: dict[int, str] = {}  # storage -> the block that saved it first
        self.block: str | None = None

    def add(self, t: torch.Tensor) -> None:
        if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
            return
        k = _key(t)
        if k in self.excluded:
            return
        if k in self.saved and self._alive(k):
            self.saved[k][1].append(weakref.ref(t))
            return
        self.saved[k] = (t.untyped_storage().nbytes(), [weakref.ref(t)])
        self.block_of[k] = self.block or "outside blocks"

    def _alive(self, k: int) -> bool:
        refs = self.saved[k][1]
        refs[:] = [r for r in refs if r() is not None]
        return bool(refs)

    def add_all(self, obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            self.add(obj)
        elif isinstance(obj, (list, tuple)):
            for o in obj:
                self.add_all(o)
        elif isinstance(obj, dict):
            for o in obj.values():
                self.add_all(o)

    @property
    def total(self) -> int:
        return sum(self.by_block().values())

    def by_block(self) -> dict[str, int]:
        """Bytes still kept, by the block that saved them ("outside blocks" for the rest)."""
        out: dict[str, int] = {}
        for k, (n, _) in self.saved.items():
            if self._alive(k):
                out[self.block_of[k]] = out.get(self.block_of[k], 0) + n
        return out

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        self.add(t)
        return t

    @contextlib.contextmanager
    def counting(self, transformer: torch.nn.Module) -> Iterator[SavedBytes]:
        """Count inside this context: saved tensors, checkpointed blocks' inputs, which block saved."""
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t))
            for name, block in block_modules(transformer):
                stack.callback(block.register_forward_pre_hook(self._enter(name)).remove)
                stack.callback(block.register_forward_hook(self._leave).remove)
            for module in transformer.modules():
                func = getattr(module, "_gradient_checkpointing_func", None)
                if func is not None and getattr(module, "gradient_checkpointing", False):
                    module._gradient_checkpointing_func = self._recording(func)
                    stack.callback(setattr, module, "_gradient_checkpointing_func", func)
            yield self

    def _enter(self, name: str):
        def hook(module, args):
            self.block = name

        return hook

    def _leave(self, module, args, output) -> None:
        self.block = None

    def _recording(self, func):
        def checkpointed(block, *args, **kwargs):
            self.add_all(args)  # the recomputation's inputs stay alive until backward
            self.add_all(kwargs)
            return func(block, *args, **kwargs)

        return checkpointed


def block_modules(transformer: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The repeated transformer blocks: children of every ModuleList named `*blocks`."""
    out = []
    for name, child in transformer.named_children():
        if isinstance(child, torch.nn.ModuleList) and name.endswith("blocks"):
            out += [(f"{name}.{i}", block) for i, block in enumerate(child)]
    return out
