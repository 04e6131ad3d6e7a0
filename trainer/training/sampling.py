"""Flow-matching Euler sampling over the same `model.predict` the training loss uses.

It follows diffusers' FluxPipeline step for step (same noise, same sigma schedule, same guidance
embedding), so without real CFG it reproduces the pipeline's images; with `guidance_real > 1` it does
real CFG with a negative prompt through `guidance.adaptive_cfg` (the algorithm ComfyUI's
AdaptiveGuider node runs): the first steps without CFG, and optionally CFG switched off once cond and
uncond agree to `cfg_threshold`.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from PIL import Image

from .flow import FLUX_BASE_SEQ_LEN, FLUX_BASE_SHIFT, FLUX_MAX_SEQ_LEN, FLUX_MAX_SHIFT, auto_shift_mu
from .guidance import AdaptiveCFG, GuidanceStats, adaptive_cfg


def _mu(scheduler_config, image_seq_len: int) -> float:
    """FluxPipeline's `calculate_shift` with the scheduler's own line ends (flow.auto_shift_mu)."""
    c = scheduler_config
    return auto_shift_mu(
        image_seq_len,
        c.get("base_image_seq_len", FLUX_BASE_SEQ_LEN),
        c.get("max_image_seq_len", FLUX_MAX_SEQ_LEN),
        c.get("base_shift", FLUX_BASE_SHIFT),
        c.get("max_shift", FLUX_MAX_SHIFT),
    )


def sampling_sigmas(
    model, latent_h: int, latent_w: int, steps: int, shift: float | None = None
) -> torch.Tensor:
    """The pipeline's sigma schedule for this size, ending in 0. A family with its own schedule
    (HiDream: fixed shift) takes `shift`; Flux follows FluxPipeline's resolution-dependent one."""
    if hasattr(model, "sampling_sigmas"):
        return torch.as_tensor(model.sampling_sigmas(latent_h, latent_w, steps, shift)).float()
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(model.noise_scheduler.config)
    sigmas = np.linspace(1.0, 1 / steps, steps)
    kwargs = {}
    if scheduler.config.get("use_dynamic_shifting", False):
        kwargs["mu"] = _mu(scheduler.config, (latent_h // 2) * (latent_w // 2))
    scheduler.set_timesteps(sigmas=sigmas, device="cpu", **kwargs)
    return scheduler.sigmas.float()


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    arr = (
        ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    )
    return [Image.fromarray(a) for a in arr]


@torch.no_grad()
def sample_latents(
    model,
    embeds: dict[str, torch.Tensor],
    *,
    width: int,
    height: int,
    steps: int,
    guidance: float,
    seed: int,
    negative_embeds: dict[str, torch.Tensor] | None = None,
    guidance_real: float = 1.0,
    no_cfg_steps: int = 0,
    shift: float | None = None,
    cfg_threshold: float = 1.0,
    uncond_zero_scale: float = 0.0,
    stats: GuidanceStats | None = None,
) -> tuple[torch.Tensor, int]:
    """Sample latents for one batch of prompt embeds; returns (latents, steps that ran real CFG).
    `stats`, when given, is filled with what the guidance did (evaluations, switch step)."""
    batch = next(iter(embeds.values())).shape[0]
    h, w = 2 * (height // 16), 2 * (width // 16)
    generator = torch.Generator("cpu").manual_seed(seed)
    x = torch.randn((batch, 16, h, w), generator=generator, dtype=torch.float32).to(model.device, model.dtype)
    sigmas = sampling_sigmas(model, h, w, steps, shift)
    g = torch.full((batch,), float(guidance), device=model.device)
    real = guidance_real if negative_embeds is not None else 1.0
    settings = AdaptiveCFG(real, cfg_threshold, no_cfg_steps, uncond_zero_scale)
    stats = stats if stats is not None else GuidanceStats()
    stats.reset()
    for i in range(steps):
        s = sigmas[i].expand(batch).to(model.device)

        def predict(with_uncond: bool, x=x, s=s):
            cond = model.predict(x, s, embeds, g)
            return cond, (model.predict(x, s, negative_embeds, g) if with_uncond else None)

        v = adaptive_cfg(settings, stats, float(sigmas[i]), sigmas, predict)
        x = (x.float() + (sigmas[i + 1] - sigmas[i]) * v.float()).to(model.dtype)
    return x, stats.cfg_steps


def sample_images(
    model, prompts: list[str], negative_prompt: str | None = None, **kwargs
) -> tuple[list, int]:
    """Render prompts to PIL images; kwargs as `sample_latents`. Returns (images, CFG steps)."""
    embeds = model.encode_prompts(prompts)
    negative = None
    if negative_prompt is not None and kwargs.get("guidance_real", 1.0) > 1:
        negative = model.encode_prompts([negative_prompt] * len(prompts))
    latents, cfg_steps = sample_latents(model, embeds, negative_embeds=negative, **kwargs)
    return to_pil(model.decode_latents(latents)), cfg_steps
