"""Validation images: every prompt (validation_prompt + user_prompt_library) at every resolution."""

from __future__ import annotations

import logging
from pathlib import Path

from .prompts import parse_resolutions, validation_image_path, validation_prompts
from .sampling import sample_images

log = logging.getLogger("tunegraph")


def render_validation(
    cfg, model, output_dir: Path, step: int, instance_prompt: str | None = None
) -> list[Path]:
    """Render and save `output_dir/validation/step-NNNNNN/<nickname>-<W>x<H>.png`; returns the paths."""
    prompts = validation_prompts(cfg, instance_prompt)
    if not prompts:
        return []
    seed = cfg.validation_seed if cfg.validation_seed is not None else cfg.seed
    real_cfg, no_cfg_steps = cfg.validation_guidance_real, cfg.validation_no_cfg_until_timestep
    if model.guidance_is_cfg:  # HiDream: validation_guidance is real CFG on every step, as its pipeline
        real_cfg, no_cfg_steps = max(cfg.validation_guidance, real_cfg), 0
    paths = []
    for width, height in parse_resolutions(cfg.validation_resolution):
        for nickname, prompt in prompts:
            images, _ = sample_images(
                model,
                [prompt],
                cfg.validation_negative_prompt,
                width=width,
                height=height,
                steps=cfg.validation_num_inference_steps,
                guidance=cfg.validation_guidance,
                seed=seed,
                guidance_real=real_cfg,
                no_cfg_steps=no_cfg_steps,
                cfg_threshold=cfg.validation_adaptive_cfg_threshold,
                shift=cfg.flow_schedule_shift,
            )
            path = validation_image_path(output_dir, step, nickname, width, height)
            path.parent.mkdir(parents=True, exist_ok=True)
            images[0].save(path)
            paths.append(path)
    log.info("step %d: %d validation image(s) in %s", step, len(paths), paths[0].parent)
    return paths
