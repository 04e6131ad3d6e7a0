"""Our training step: the real `prepare_run` + `optimizer_step`, fed a synthetic batch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..config import TrainConfig
from ..training import run as run_module
from ..training.loop import optimizer_step
from .build import SyntheticData
from .cases import LOKR, SHIFT, Case
from .timing import Timing, time_steps


def bench_config(case: Case, workdir: Path, seed: int, lr: float, bypass: bool, smoke: bool) -> TrainConfig:
    """The quickstart's settings for one case, as a SimpleTuner config dict."""
    lokr = {**LOKR, **({"bypass_mode": True} if bypass else {})}
    lycoris_path = workdir / "lycoris_config.json"
    lycoris_path.write_text(json.dumps(lokr))
    return TrainConfig.from_dict(
        {
            "model_family": case.family,
            "model_flavour": "tiny" if smoke else ("dev" if case.family == "flux" else "full"),
            "output_dir": str(workdir / "output"),
            "lora_type": "lycoris",
            "lycoris_config": str(lycoris_path),
            "mixed_precision": "bf16",
            "base_model_precision": case.base_model_precision,
            "base_model_default_dtype": "bf16",
            "gradient_checkpointing": case.checkpointing,
            "train_batch_size": 1,
            "resolution": case.resolution,
            "optimizer": "adamw",
            "learning_rate": lr,
            "seed": seed,
            "max_train_steps": 1_000_000,
            "flow_schedule_shift": SHIFT,
            "flow_schedule_auto_shift": False,
            "flow_sigmoid_scale": 1.0,
            "flux_guidance_value": 1.0,
            "disable_validation": True,
        },
        base_dir=workdir,
        source="<bench>",
    )


def our_step(
    model: Any, cfg: TrainConfig, batch: dict[str, Any], warmup: int, steps: int
) -> tuple[Timing, int, int]:
    """Time our step on `model`; returns (timing, trainable params, wrapped modules). The adapter
    is removed again afterwards, leaving the (possibly now quantised) base for the next case."""
    run = run_module.prepare_run(cfg, model=model, data=SyntheticData(batch))
    if not cfg.gradient_checkpointing:
        model.transformer.disable_gradient_checkpointing()
    try:
        timing = time_steps(lambda: optimizer_step(run)["loss"], run.device, warmup, steps)
        trainable = sum(p.numel() for p in run.adapter.parameters() if p.requires_grad)
        wrapped = len(run.adapter.wrapped_module_names)
    finally:
        run.adapter.remove()
        model.transformer.disable_gradient_checkpointing()
    return timing, trainable, wrapped


def release(model: Any) -> None:
    """Drop the transformer's weights (the bundle keeps a reference otherwise)."""
    model.transformer = torch.nn.Identity()
