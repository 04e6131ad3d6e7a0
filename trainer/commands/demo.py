"""`tunegraph demo`: the tiny Flux LoKr trained end to end on a generated dataset, about a minute on CPU.

It writes real SimpleTuner-style config files into `<out>/config/` and trains from them exactly as
`tunegraph train --config <out>/config/config.json` would, so the demo doubles as a config example.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ..config import load_config
from ..data.demo import make_demo_dataset
from ..training.loop import train

log = logging.getLogger("tunegraph")

DEMO_STEPS = 120
LYCORIS = {
    "algo": "lokr",
    "multiplier": 1.0,
    "linear_dim": 10000,
    "linear_alpha": 1,
    "full_matrix": True,
    "factor": 4,
    "apply_preset": {"target_module": ["Attention"]},
}


def write_demo_config(out: Path, steps: int = DEMO_STEPS) -> Path:
    """Generate the dataset and write config.json, multidatabackend.json and lycoris_config.json."""
    out = out.resolve()
    data_dir = make_demo_dataset(out / "data")
    conf = out / "config"
    conf.mkdir(parents=True, exist_ok=True)
    backends = [
        {
            "id": "demo-shapes",
            "type": "local",
            "instance_data_dir": str(data_dir),
            "caption_strategy": "textfile",
            "resolution": 64,
            "resolution_type": "pixel_area",
            "crop": True,
            "crop_aspect": "square",
            "crop_style": "center",
            "cache_dir_vae": str(out / "cache" / "vae" / "demo-shapes"),
            "repeats": 0,
        },
        {
            "id": "text-embeds",
            "type": "local",
            "dataset_type": "text_embeds",
            "default": True,
            "cache_dir": str(out / "cache" / "text"),
        },
    ]
    config = {
        "model_type": "lora",
        "model_family": "flux",
        "model_flavour": "tiny",
        "output_dir": str(out),
        "data_backend_config": "multidatabackend.json",
        "lora_type": "lycoris",
        "lycoris_config": "lycoris_config.json",
        "optimizer": "adamw",
        "learning_rate": "1e-2",  # high for a real model; the tiny random one needs it to move in 120 steps
        "lr_scheduler": "constant_with_warmup",
        "lr_warmup_steps": 5,
        "max_train_steps": steps,
        "train_batch_size": 2,
        "mixed_precision": "no",
        "max_grad_norm": 1.0,
        "grad_clip_method": "norm",
        "seed": 42,
        "checkpoint_step_interval": max(1, steps // 2),
        "checkpoints_total_limit": 2,
        "eval_steps_interval": max(1, steps // 10),
        "num_eval_images": 4,
        "eval_timesteps": 8,
        "validation_prompt": "a red circle on a blue background",
        "validation_step_interval": steps,
        "validation_resolution": "64x64,96x64",
        "validation_num_inference_steps": 8,
        "validation_guidance": 1.0,
        "report_to": "none",
    }
    (conf / "multidatabackend.json").write_text(json.dumps(backends, indent=2))
    (conf / "lycoris_config.json").write_text(json.dumps(LYCORIS, indent=2))
    (conf / "config.json").write_text(json.dumps(config, indent=2))
    return conf / "config.json"


def run_demo(out: Path, steps: int | None = None) -> dict[str, Any]:
    config_path = write_demo_config(Path(out), steps or DEMO_STEPS)
    cfg = load_config(config_path)
    summary = train(cfg)
    summary["config"] = str(config_path)
    log.info(
        "demo done in %.0f s: eval loss %.4f -> %.4f; adapter %s, loss plot %s",
        summary["seconds"],
        summary["eval_loss_first"] or float("nan"),
        summary["eval_loss_last"] or float("nan"),
        summary["adapter"],
        summary["loss_plot"],
    )
    return summary
