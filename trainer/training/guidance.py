"""Adaptive classifier-free guidance: one algorithm for the trainer's validation sampler and ComfyUI.

Per sampling step (a sigma of the schedule):
- the first `no_cfg_steps` steps of the schedule run without CFG (worked out from the sigma, so a
  second run, a new seed or a multi-evaluation sampler sees the same steps; nothing counts calls);
- otherwise cond and uncond are predicted and combined as `uncond + cfg * (cond - uncond)`; once the
  cosine similarity of the two predictions reaches `threshold` (< 1), CFG is off for every later,
  lower-sigma step of the run: the model is then evaluated for cond only;
- after that switch, `uncond_zero_scale > 0` guides against the cond's own mean instead of an uncond
  (`mean + scale * (cond - mean)`, per sample), which costs no extra evaluation.

The similarity is taken between the two velocity predictions. A caller working in denoised (x0) space
passes `origin=x`: x - denoised = sigma * velocity, so the cosine (and uncond-zero) are the same.
Nothing here edits its inputs in place.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..errors import ConfigError

Predict = Callable[[bool], tuple[torch.Tensor, torch.Tensor | None]]


@dataclass(frozen=True)
class AdaptiveCFG:
    """Settings. threshold >= 1 never switches CFG off (plain CFG); cfg <= 1 never runs CFG."""

    cfg: float = 1.0
    threshold: float = 1.0
    no_cfg_steps: int = 0
    uncond_zero_scale: float = 0.0

    def __post_init__(self) -> None:
        if self.no_cfg_steps < 0:
            raise ConfigError(f"initial steps without CFG must be >= 0, got {self.no_cfg_steps}")
        if not -1.0 <= self.threshold:
            raise ConfigError(f"CFG cosine threshold must be in [-1, 1], got {self.threshold}")


@dataclass
class GuidanceStats:
    """What one sampling run did; `reset` at the start of every run."""

    steps: int = 0
    cfg_steps: int = 0
    evaluations: int = 0  # model evaluations per sample: 2 for a CFG step, 1 otherwise
    off_below_sigma: float | None = None  # CFG is off for sigmas below this one
    switch_step: int | None = None
    similarities: list[float] = field(default_factory=list)

    def reset(self) -> None:
        self.__init__()

    def summary(self) -> str:
        switch = "never" if self.switch_step is None else f"after step {self.switch_step}"
        return (
            f"{self.cfg_steps}/{self.steps} steps ran CFG ({self.evaluations} model evaluations; "
            f"CFG switched off {switch})"
        )


def schedule_index(sigmas: Sequence[float] | torch.Tensor, sigma: float) -> int:
    """Index of the schedule step `sigma` belongs to: how many schedule sigmas lie above it."""
    s = torch.as_tensor(sigmas, dtype=torch.float64).flatten()
    tol = 1e-6 * max(1.0, abs(float(sigma)))
    return int((s > float(sigma) + tol).sum().item())


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two whole predictions (all samples together), in float64, in [-1, 1]."""
    a64, b64 = a.detach().double().flatten(), b.detach().double().flatten()
    denom = a64.norm() * b64.norm()
    if denom == 0:
        return 1.0
    return float((a64 @ b64 / denom).clamp(-1.0, 1.0))


def cfg_wanted(settings: AdaptiveCFG, stats: GuidanceStats, sigma: float, sigmas) -> bool:
    """Whether the step at `sigma` evaluates the uncond and runs CFG."""
    if settings.cfg <= 1.0 or schedule_index(sigmas, sigma) < settings.no_cfg_steps:
        return False
    return stats.off_below_sigma is None or float(sigma) >= stats.off_below_sigma


def uncond_zero(pred: torch.Tensor, scale: float, origin: torch.Tensor | None = None) -> torch.Tensor:
    """Guidance against the prediction's own per-sample mean: mean + scale * (pred - mean)."""
    v = pred if origin is None else origin - pred
    mean = v.mean(dim=tuple(range(1, v.ndim)), keepdim=True)
    out = mean + scale * (v - mean)
    return out if origin is None else origin - out


def adaptive_cfg(
    settings: AdaptiveCFG,
    stats: GuidanceStats,
    sigma: float,
    sigmas,
    predict: Predict,
    origin: torch.Tensor | None = None,
    combine: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """The guided prediction for one step. `predict(with_uncond)` returns (cond, uncond or None);
    `combine(cond, uncond)` replaces the plain CFG formula (ComfyUI passes its cfg_function)."""
    wanted = cfg_wanted(settings, stats, sigma, sigmas)
    cond, uncond = predict(wanted)
    stats.steps += 1
    if not wanted or uncond is None:
        stats.evaluations += 1
        if stats.off_below_sigma is not None and settings.uncond_zero_scale > 0:
            return uncond_zero(cond, settings.uncond_zero_scale, origin)
        return cond
    stats.evaluations += 2
    stats.cfg_steps += 1
    out = combine(cond, uncond) if combine is not None else uncond + settings.cfg * (cond - uncond)
    if settings.threshold < 1.0:
        sim = cosine(cond, uncond) if origin is None else cosine(origin - cond, origin - uncond)
        stats.similarities.append(sim)
        if sim >= settings.threshold:
            stats.off_below_sigma = float(sigma)
            stats.switch_step = schedule_index(sigmas, sigma)
    return out
