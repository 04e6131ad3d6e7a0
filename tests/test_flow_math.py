import math

import pytest
import torch

from tunegraph.trainer.errors import ConfigError
from tunegraph.trainer.training.flow import (
    auto_shift_mu,
    effective_shift,
    eval_noise,
    eval_sigmas,
    flow_target,
    image_seq_len,
    noisy_latents,
    sample_sigmas,
    shift_sigmas,
)


def test_shift_sigmas_hand_values():
    s = torch.tensor([0.0, 0.25, 0.5, 1.0])
    out = shift_sigmas(s, 3.0)
    # 3*0.25/(1+2*0.25) = 0.5 ; 3*0.5/(1+2*0.5) = 0.75
    assert torch.allclose(out, torch.tensor([0.0, 0.5, 0.75, 1.0]))
    assert shift_sigmas(0.5, 1.0) == 0.5
    assert shift_sigmas(0.5, 0.5) == pytest.approx(0.25 / 0.75)
    with pytest.raises(ConfigError):
        shift_sigmas(0.5, 0.0)


def test_auto_shift_mu_matches_flux_calculate_shift():
    assert auto_shift_mu(256) == pytest.approx(0.5)
    assert auto_shift_mu(4096) == pytest.approx(1.15)
    # 1024 tokens (512 px): 0.5 + 768 * 0.65 / 3840 = 0.63
    assert auto_shift_mu(1024) == pytest.approx(0.63)
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    for n in (64, 1024, 2304, 4096, 8192):
        assert auto_shift_mu(n) == pytest.approx(calculate_shift(n))


def test_auto_shift_is_the_exp_mu_time_shift():
    """SimpleTuner's auto shift, exp(mu) / (exp(mu) + (1/s - 1)), is shift_sigmas at exp(mu)."""
    mu = 0.63
    s = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    expected = math.exp(mu) / (math.exp(mu) + (1 / s - 1))
    assert torch.allclose(shift_sigmas(s, math.exp(mu)), expected)
    assert shift_sigmas(torch.tensor([0.5]), math.exp(mu))[0].item() == pytest.approx(
        1.877611 / 2.877611, rel=1e-6
    )


def test_image_seq_len_and_effective_shift():
    assert image_seq_len(128, 128) == 4096  # 1024 px Flux latent
    assert image_seq_len(64, 96) == 32 * 48
    assert effective_shift() is None
    assert effective_shift(shift=3.0) == 3.0
    assert effective_shift(shift=0.0) is None
    # auto shift wins over a static shift (SimpleTuner zeroes flow_schedule_shift then)
    assert effective_shift(shift=3.0, auto_shift=True, image_seq_len=4096) == pytest.approx(math.exp(1.15))
    with pytest.raises(ConfigError, match="sequence length"):
        effective_shift(auto_shift=True)


def test_sample_sigmas_sigmoid_is_sigmoid_of_normal_then_shift():
    g1 = torch.Generator().manual_seed(7)
    got = sample_sigmas(5, g1, sigmoid_scale=1.5, shift=3.0)
    g2 = torch.Generator().manual_seed(7)
    s = torch.sigmoid(1.5 * torch.randn(5, generator=g2))
    assert torch.allclose(got, 3 * s / (1 + 2 * s))
    assert got.shape == (5,) and got.dtype == torch.float32


def test_sample_sigmas_uniform_and_auto_shift():
    g = torch.Generator().manual_seed(0)
    raw = sample_sigmas(4, g, method="uniform")
    g = torch.Generator().manual_seed(0)
    assert torch.equal(raw, torch.rand(4, generator=g))
    g = torch.Generator().manual_seed(0)
    shifted = sample_sigmas(4, g, method="uniform", auto_shift=True, image_seq_len=1024)
    assert torch.allclose(shifted, shift_sigmas(raw, math.exp(0.63)), atol=1e-6)
    assert bool((shifted >= raw).all())  # exp(0.63) > 1 pushes towards noise


def test_sample_sigmas_reproducible_and_in_range():
    a = sample_sigmas(1000, torch.Generator().manual_seed(3))
    b = sample_sigmas(1000, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert bool(((a > 0) & (a < 1)).all())
    assert abs(a.mean().item() - 0.5) < 0.03  # sigmoid(N(0,1)) is symmetric around 0.5
    with pytest.raises(ConfigError, match="sigmoid, uniform"):
        sample_sigmas(2, None, method="beta")


def test_noisy_latents_and_target():
    x0 = torch.ones(2, 3, 4, 4)
    noise = torch.zeros(2, 3, 4, 4)
    x = noisy_latents(x0, noise, torch.tensor([0.25, 1.0]))
    assert torch.allclose(x[0], torch.full((3, 4, 4), 0.75))
    assert torch.allclose(x[1], torch.zeros(3, 4, 4))
    noise = torch.full_like(x0, 3.0)
    assert torch.allclose(flow_target(x0, noise), torch.full_like(x0, 2.0))
    # the flow ODE: x_t moves along the target, d x_t / d sigma = noise - x0
    s = torch.tensor([0.3, 0.3])
    dx = noisy_latents(x0, noise, s + 0.1) - noisy_latents(x0, noise, s)
    assert torch.allclose(dx, 0.1 * flow_target(x0, noise), atol=1e-6)


def test_noisy_latents_keeps_dtype():
    x0 = torch.ones(1, 2, 2, dtype=torch.bfloat16)
    x = noisy_latents(x0, torch.zeros_like(x0), torch.tensor([0.5]))
    assert x.dtype == torch.bfloat16 and x.float().mean().item() == 0.5


def test_eval_sigmas_fixed_evenly_spaced():
    s = eval_sigmas(4)
    assert torch.allclose(s, torch.tensor([1.0, 0.667, 0.334, 0.001]), atol=1e-6)
    assert torch.equal(eval_sigmas(4), s)
    shifted = eval_sigmas(4, shift=3.0)
    assert shifted[0].item() == 1.0
    assert shifted[-1].item() == pytest.approx(0.003 / 1.002)
    with pytest.raises(ConfigError):
        eval_sigmas(0)


def test_eval_noise_deterministic_and_leaves_global_rng():
    before = torch.get_rng_state()
    a = eval_noise((2, 4, 8, 8), seed=0)
    b = eval_noise((2, 4, 8, 8), seed=0)
    c = eval_noise((2, 4, 8, 8), seed=1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(torch.get_rng_state(), before)
    assert eval_noise((1, 3), 0, dtype=torch.bfloat16).dtype == torch.bfloat16
