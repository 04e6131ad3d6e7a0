"""Flow-matching math: timestep (sigma) sampling, schedule shift, noisy inputs and targets.

Conventions as in SimpleTuner and diffusers' Flux: sigma runs from 0 (data) to 1 (noise),
x_t = (1 - sigma) * x0 + sigma * noise, and the model predicts the velocity noise - x0.
Random draws come from a generator the loop owns (its state goes into checkpoints), always on the
generator's device, so a CPU generator gives the same sigmas whatever device trains.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..choices import HUBER_SCHEDULES, LOSS_TYPES
from ..errors import ConfigError

# diffusers' Flux scheduler config (base_image_seq_len, max_image_seq_len, base_shift, max_shift).
FLUX_BASE_SEQ_LEN = 256
FLUX_MAX_SEQ_LEN = 4096
FLUX_BASE_SHIFT = 0.5
FLUX_MAX_SHIFT = 1.15

SAMPLING_METHODS = ("sigmoid", "uniform")


def shift_sigmas(sigmas: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    """SD3-style schedule shift: shift*s / (1 + (shift-1)*s). shift > 1 moves sigmas towards noise."""
    if shift <= 0:
        raise ConfigError(f"flow_schedule_shift must be > 0, got {shift}")
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def auto_shift_mu(
    image_seq_len: int,
    base_seq_len: int = FLUX_BASE_SEQ_LEN,
    max_seq_len: int = FLUX_MAX_SEQ_LEN,
    base_shift: float = FLUX_BASE_SHIFT,
    max_shift: float = FLUX_MAX_SHIFT,
) -> float:
    """mu for resolution-dependent shift, linear in the token count (diffusers' Flux `calculate_shift`)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + (base_shift - slope * base_seq_len)


def image_seq_len(latent_height: int, latent_width: int, patch_size: int = 2) -> int:
    """Tokens the transformer sees for one latent image (Flux packs 2x2 latent patches)."""
    return (latent_height // patch_size) * (latent_width // patch_size)


def effective_shift(
    shift: float | None = None, auto_shift: bool = False, image_seq_len: int | None = None
) -> float | None:
    """The shift to apply, or None. auto_shift wins over a static shift, as in SimpleTuner (its
    safety check zeroes flow_schedule_shift when both are set)."""
    if auto_shift:
        if image_seq_len is None or image_seq_len <= 0:
            raise ConfigError("flow_schedule_auto_shift needs the image sequence length (latent size)")
        return math.exp(auto_shift_mu(image_seq_len))
    if shift is not None and shift > 0:
        return float(shift)
    return None


def sample_sigmas(
    batch: int,
    generator: torch.Generator | None,
    *,
    method: str = "sigmoid",
    sigmoid_scale: float = 1.0,
    shift: float | None = None,
    auto_shift: bool = False,
    image_seq_len: int | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Training sigmas, shape [batch], float32: sigmoid(scale * N(0,1)) (SimpleTuner's default
    logit-normal) or U[0,1), then shifted."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    if method == "sigmoid":
        normal = torch.randn(batch, generator=generator, device=gen_device)
        sigmas = torch.sigmoid(sigmoid_scale * normal)
    elif method == "uniform":
        sigmas = torch.rand(batch, generator=generator, device=gen_device)
    else:
        raise ConfigError(
            f"sigma sampling method must be one of {', '.join(SAMPLING_METHODS)}, got {method!r}"
        )
    s = effective_shift(shift, auto_shift, image_seq_len)
    if s is not None:
        sigmas = shift_sigmas(sigmas, s)
    return sigmas.to(device) if device is not None else sigmas


def _expand(sigmas: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] -> [B, 1, 1, ...] in `like`'s dtype and device, to broadcast over one sample."""
    return sigmas.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def noisy_latents(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - sigma) * x0 + sigma * noise, one sigma per sample."""
    s = _expand(sigmas, x0)
    return (1 - s) * x0 + s * noise


def flow_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The velocity the model learns to predict: noise - x0."""
    return noise - x0


def eval_sigmas(
    n: int, *, shift: float | None = None, auto_shift: bool = False, image_seq_len: int | None = None
) -> torch.Tensor:
    """n fixed sigmas for the stable eval loss, as SimpleTuner's eval uses a scheduler's
    `set_timesteps(eval_timesteps)`: evenly spaced from 1 down to 1/1000, then the same shift as
    training. float32, shape [n]."""
    if n < 1:
        raise ConfigError(f"the number of eval timesteps must be at least 1, got {n}")
    sigmas = torch.linspace(1.0, 1.0 / 1000, n, dtype=torch.float64)
    s = effective_shift(shift, auto_shift, image_seq_len)
    if s is not None:
        sigmas = shift_sigmas(sigmas, s)
    return sigmas.float()


def eval_noise(
    shape: Sequence[int], seed: int, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Noise that depends only on (shape, seed): drawn on CPU from its own generator, so eval loss
    is a function of the weights alone and never touches the training RNG."""
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randn(tuple(shape), generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)


# issue 15: SimpleTuner's loss_type for flow-matching models (models/common.py `conditional_loss`
# and `compute_scheduled_huber_c`, whose timesteps are sigma * 1000).


def huber_c_per_sample(sigmas: torch.Tensor, huber_c: float, schedule: str) -> torch.Tensor:
    """huber_c for each sample: constant; exponential exp(-alpha t) with alpha = -ln(c)/1000, i.e.
    c ** sigma; snr (1 - c) / (1 + sqrt((1 - s) / (s + 1e-4)))^2 + c, as SimpleTuner computes it."""
    s = sigmas.float()
    if schedule == "constant":
        return torch.full_like(s, float(huber_c))
    if schedule == "exponential":
        return torch.exp(math.log(huber_c) / 1000 * (s * 1000))
    if schedule == "snr":
        k = ((1.0 - s) / (s + 0.0001)) ** 0.5
        return (1 - huber_c) / (1 + k) ** 2 + huber_c
    raise ConfigError(f"key 'huber_schedule': {schedule!r} is not one of {', '.join(HUBER_SCHEDULES)}")


def flow_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    sigmas: torch.Tensor,
    loss_type: str = "l2",
    huber_c: float = 0.1,
    huber_schedule: str = "snr",
) -> torch.Tensor:
    """Mean loss: l2 = MSE; huber = 2c(sqrt(d^2 + c^2) - c); smooth_l1 = 2(sqrt(d^2 + c^2) - c)."""
    if loss_type == "l2":
        return torch.nn.functional.mse_loss(pred, target)
    if loss_type not in LOSS_TYPES:
        raise ConfigError(f"key 'loss_type': {loss_type!r} is not one of {', '.join(LOSS_TYPES)}")
    c = _expand(huber_c_per_sample(sigmas, huber_c, huber_schedule), pred)
    root = torch.sqrt((pred - target) ** 2 + c**2) - c
    return (2 * c * root if loss_type == "huber" else 2 * root).mean()
