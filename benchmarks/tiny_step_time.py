"""Step time of the tiny models on this machine, as ratios against a baseline measured in the same run.

    .venv/bin/python benchmarks/tiny_step_time.py [--steps 20] [--family flux]

Each case trains `--steps` optimizer steps (after 3 warm-up steps) on the demo dataset and prints
seconds per step and the ratio to the first case (LoKr, batch 1, 64 px). Not a test: numbers move
with the machine; compare ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from tunegraph.trainer.commands.demo import write_demo_config
from tunegraph.trainer.config import load_config
from tunegraph.trainer.training.loop import optimizer_step
from tunegraph.trainer.training.run import prepare_run

CASES = [
    ("LoKr attn, bs1, 64px", {"train_batch_size": 1}),
    ("LoKr attn, bs2, 64px", {"train_batch_size": 2}),
    ("LoKr attn, bs1, 128px", {"train_batch_size": 1, "resolution": 128}),
    ("LoKr attn, bs1, grad ckpt", {"train_batch_size": 1, "gradient_checkpointing": True}),
    ("LoRA r16 all, bs1, 64px", {"train_batch_size": 1, "lora_type": "standard", "lora_rank": 16}),
    ("LoKr attn, bs1, bf16 weights", {"train_batch_size": 1, "mixed_precision": "bf16"}),
]


def time_case(config: Path, out: Path, family: str, overrides: dict, steps: int) -> float:
    resolution = overrides.pop("resolution", None)
    cfg = load_config(
        config,
        {
            "output_dir": str(out),
            "model_family": family,
            "validation_prompt": None,
            "eval_steps_interval": None,
            "max_train_steps": steps + 3,
            **overrides,
        },
    )
    if resolution:  # rewrite the dataset resolution through the backend file
        backends = json.loads(Path(cfg.input_path("data_backend_config")).read_text())
        backends[0].update(resolution=resolution, cache_dir_vae=str(out / "vae"))
        path = out / "backends.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(backends))
        cfg = cfg.replace(data_backend_config=str(path))
    run = prepare_run(cfg)
    for _ in range(3):
        optimizer_step(run)
    t0 = time.perf_counter()
    for _ in range(steps):
        optimizer_step(run)
    return (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--family", default="flux", choices=["flux", "hidream"])
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    with tempfile.TemporaryDirectory() as tmp:
        config = write_demo_config(Path(tmp) / "demo", steps=10)
        print(f"| case ({args.family} tiny, CPU, {torch.get_num_threads()} threads) | s/step | ratio |")
        print("| --- | --- | --- |")
        base = None
        for i, (name, overrides) in enumerate(CASES):
            s = time_case(config, Path(tmp) / f"case{i}", args.family, dict(overrides), args.steps)
            base = base or s
            print(f"| {name} | {s:.3f} | {s / base:.2f} |", flush=True)


if __name__ == "__main__":
    main()
