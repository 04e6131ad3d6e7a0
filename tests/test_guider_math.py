"""The adaptive-CFG algorithm (trainer/training/guidance.py) on plain tensors."""

from __future__ import annotations

import pytest
import torch

from tunegraph.trainer.errors import ConfigError
from tunegraph.trainer.training.guidance import (
    AdaptiveCFG,
    GuidanceStats,
    adaptive_cfg,
    cfg_wanted,
    cosine,
    schedule_index,
    uncond_zero,
)

SIGMAS = torch.tensor([1.0, 0.8, 0.55, 0.3, 0.1, 0.0])


def test_schedule_index_follows_the_sigma_not_a_counter() -> None:
    assert [schedule_index(SIGMAS, float(s)) for s in SIGMAS[:-1]] == [0, 1, 2, 3, 4]
    assert schedule_index(SIGMAS, 0.7) == 2  # a second-order sampler's in-between sigma: the next step
    assert schedule_index(SIGMAS, 0.8 - 1e-9) == 1  # float noise around a schedule value


def test_initial_steps_without_cfg_and_cfg_one() -> None:
    stats = GuidanceStats()
    flags = [cfg_wanted(AdaptiveCFG(3.0, 1.0, 2), stats, float(s), SIGMAS) for s in SIGMAS[:-1]]
    assert flags == [False, False, True, True, True]
    assert not any(cfg_wanted(AdaptiveCFG(1.0), stats, float(s), SIGMAS) for s in SIGMAS[:-1])


def test_cosine_values() -> None:
    a = torch.tensor([[1.0, 0.0]])
    assert cosine(a, a) == 1.0
    assert cosine(a, torch.tensor([[0.0, 2.0]])) == 0.0
    assert cosine(a, -a) == -1.0
    assert cosine(a, torch.tensor([[1.0, 1.0]])) == pytest.approx(2**-0.5)


def run_steps(settings: AdaptiveCFG, cond: torch.Tensor, uncond: torch.Tensor) -> tuple[list, GuidanceStats]:
    stats, outs, asked = GuidanceStats(), [], []
    for s in SIGMAS[:-1]:
        outs.append(adaptive_cfg(settings, stats, float(s), SIGMAS,
                                 lambda u: (asked.append(u), (cond, uncond if u else None))[1]))  # fmt: skip
    return outs, stats


def test_switch_off_once_similar_and_evaluations_counted() -> None:
    cond, uncond = torch.tensor([[1.0, 0.1]]), torch.tensor([[1.0, 0.0]])  # cosine 0.995
    outs, stats = run_steps(AdaptiveCFG(3.0, 0.99, 1), cond, uncond)
    assert torch.allclose(outs[0], cond)  # initial step: cond only
    assert torch.allclose(outs[1], uncond + 3.0 * (cond - uncond))  # CFG, then similar enough
    assert all(torch.equal(o, cond) for o in outs[2:])
    assert (stats.cfg_steps, stats.evaluations, stats.switch_step, stats.steps) == (1, 6, 1, 5)
    assert stats.similarities == [pytest.approx(cosine(cond, uncond))]
    outs, stats = run_steps(AdaptiveCFG(3.0, 0.999, 1), cond, uncond)  # never similar enough
    assert (stats.cfg_steps, stats.evaluations, stats.switch_step) == (4, 9, None)


def test_threshold_one_never_switches_even_for_identical_predictions() -> None:
    cond = torch.tensor([[1.0, 2.0]])
    _, stats = run_steps(AdaptiveCFG(2.0, 1.0), cond, cond.clone())
    assert stats.cfg_steps == 5 and stats.switch_step is None


def test_uncond_zero_after_the_switch_without_editing_inputs() -> None:
    cond, uncond = torch.tensor([[1.0, 3.0]]), torch.tensor([[1.0, 2.9]])
    keep = cond.clone()
    outs, _ = run_steps(AdaptiveCFG(3.0, 0.9, 0, uncond_zero_scale=2.0), cond, uncond)
    assert torch.allclose(outs[1], torch.tensor([[0.0, 4.0]]))  # mean 2 + 2 * (cond - 2)
    assert torch.equal(cond, keep)


def test_uncond_zero_is_the_same_in_denoised_space() -> None:
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    sigma = 0.6
    denoised = x - sigma * v
    out = uncond_zero(denoised, 1.7, origin=x)
    assert torch.allclose((x - out) / sigma, uncond_zero(v, 1.7), atol=1e-6)


def test_bad_settings_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="without CFG"):
        AdaptiveCFG(3.0, 0.99, -1)
    with pytest.raises(ConfigError, match="threshold"):
        AdaptiveCFG(3.0, -2.0)
