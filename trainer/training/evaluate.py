"""Stable eval loss: the same items, sigmas and noise every time, so it moves only with the weights."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .flow import eval_noise, eval_sigmas, flow_target, image_seq_len, noisy_latents


@dataclass
class EvalSet:
    items: list[dict[str, Any]] = field(default_factory=list)  # {"latents": [C,h,w], "embeds": {k: [...]}}

    def __bool__(self) -> bool:
        return bool(self.items)

    @classmethod
    def build(cls, run) -> EvalSet:
        if not run.cfg.eval_steps_interval:
            return cls()
        return cls(run.data.eval_items(max(1, run.cfg.num_eval_images or 1)))

    @torch.no_grad()
    def loss(self, run) -> float:
        """Mean flow-matching loss over items x fixed sigmas (EMA weights when EMA is on)."""
        total, count = 0.0, 0
        with run.ema_weights():
            for i, item in enumerate(self.items):
                x0 = item["latents"].unsqueeze(0).to(run.device, torch.float32)
                sigmas = eval_sigmas(
                    run.cfg.eval_timesteps,
                    shift=run.shift,
                    auto_shift=run.cfg.flow_schedule_auto_shift,
                    image_seq_len=image_seq_len(x0.shape[-2], x0.shape[-1]),
                )
                embeds = {
                    k: v.unsqueeze(0).to(run.device, run.model.dtype) for k, v in item["embeds"].items()
                }
                guidance = torch.full((1,), float(run.cfg.flux_guidance_value), device=run.device)
                for j, s in enumerate(sigmas):
                    noise = eval_noise(x0.shape, seed=1000 * i + j, device=run.device)
                    xt = noisy_latents(x0, noise, s.reshape(1)).to(run.model.dtype)
                    pred = run.model.predict(xt, s.reshape(1).to(run.device), embeds, guidance)
                    total += torch.nn.functional.mse_loss(pred.float(), flow_target(x0, noise)).item()
                    count += 1
        return total / max(count, 1)
