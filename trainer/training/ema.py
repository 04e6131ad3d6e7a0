"""Exponential moving average of the adapter weights, swapped in for validation and saving."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from ..errors import TrainingError


def _params(source: Any) -> list[torch.nn.Parameter]:
    """An adapter (anything with .parameters()) or an iterable of parameters."""
    return list(source.parameters() if hasattr(source, "parameters") else source)


class EMA:
    """shadow <- decay * shadow + (1 - decay) * param, after every optimizer step.

    Kept in float32 on the parameters' device, whatever the parameters' dtype.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], decay: float = 0.995):
        if not 0.0 <= decay < 1.0:
            raise TrainingError(f"ema_decay must be in [0, 1), got {decay}")
        self.params = list(params)
        self.decay = float(decay)
        self.num_updates = 0
        self.shadow = [p.detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        for shadow, p in zip(self.shadow, self.params, strict=True):
            shadow.lerp_(p.detach().float(), 1.0 - self.decay)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, params: Iterable[torch.nn.Parameter]) -> None:
        targets = list(params)
        self._check(targets)
        for shadow, p in zip(self.shadow, targets, strict=True):
            p.copy_(shadow.to(p.dtype))

    def _check(self, targets: list[torch.nn.Parameter]) -> None:
        if len(targets) != len(self.shadow) or any(
            t.shape != s.shape for t, s in zip(targets, self.shadow, strict=False)
        ):
            raise TrainingError("EMA weights do not fit these parameters (another adapter config?)")

    @contextmanager
    def swapped_in(self, adapter: Any) -> Iterator[None]:
        """Run the block with the EMA weights in the adapter, then put the trained weights back."""
        targets = _params(adapter)
        self._check(targets)
        saved = [p.detach().clone() for p in targets]
        try:
            self.copy_to(targets)
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(targets, saved, strict=True):
                    p.copy_(s)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat tensors (safetensors-ready): decay, num_updates, shadow.0 .. shadow.N-1."""
        state = {
            "decay": torch.tensor(self.decay, dtype=torch.float64),
            "num_updates": torch.tensor(self.num_updates, dtype=torch.int64),
        }
        state.update({f"shadow.{i}": s.detach().clone() for i, s in enumerate(self.shadow)})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        shadow = [state.get(f"shadow.{i}") for i in range(len(self.shadow))]
        extra = [
            k
            for k in state
            if k.startswith("shadow.") and k not in {f"shadow.{i}" for i in range(len(shadow))}
        ]
        if extra or any(a is None or a.shape != b.shape for a, b in zip(shadow, self.shadow, strict=True)):
            raise TrainingError("EMA state in the checkpoint does not fit this adapter")
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])
        self.shadow = [
            s.to(device=t.device, dtype=torch.float32).clone()
            for s, t in zip(shadow, self.shadow, strict=True)
        ]
