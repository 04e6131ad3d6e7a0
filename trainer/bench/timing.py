"""Step timing and peak memory, CUDA-synchronised, after warm-up steps."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Timing:
    first_loss: float  # loss of the very first step (the fixed-batch numerics check)
    seconds: float  # mean s/step over the timed steps
    peak_gib: float | None  # torch.cuda.max_memory_allocated over warm-up and timed steps


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], float], device: torch.device, warmup: int, steps: int) -> Timing:
    """Run `step` (returns the loss) `warmup` then `steps` times; time only the latter."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    first = step()
    for _ in range(max(0, warmup - 1)):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    seconds = (time.perf_counter() - t0) / max(1, steps)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return Timing(first_loss=first, seconds=seconds, peak_gib=peak)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()
