"""Resident host memory during training steps, with and without the text encoders held.

    .venv/bin/python benchmarks/phase_memory.py [--t5-mib 512] [--steps 4] [--json]

Writes the tiny Flux model as a diffusers folder with its T5 widened (feed-forward only, so the
embedding width the transformer reads stays the same) to about `--t5-mib` MiB in bf16, then trains
it twice through the real `train()` in fresh processes, sampling VmRSS after every optimizer step:

- held: the model is loaded by the caller and lent to `train` (every component stays referenced,
  as every run did before memory-by-phase);
- phased: `train` loads the model itself, so its text encoders are freed once the cache is filled.

The difference of the peaks should be about the text encoders' bytes. Not a test: RSS depends on
the allocator and the machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from tunegraph.trainer.commands.demo import write_demo_config
from tunegraph.trainer.config import load_config
from tunegraph.trainer.models.flux import FluxModel
from tunegraph.trainer.models.tiny import tiny_flux_parts
from tunegraph.trainer.quantize import module_bytes


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def write_model(folder: Path, t5_mib: int) -> dict:
    """The tiny Flux with a T5 whose gated feed-forward has been widened to ~t5_mib MiB (bf16)."""
    from transformers import T5EncoderModel

    parts = tiny_flux_parts(0)
    config = parts["text_encoder_2"].config
    per_unit = 3 * config.d_model * 2 * config.num_layers  # wi_0, wi_1, wo per d_ff unit, bf16 bytes
    config.d_ff = max(config.d_ff, t5_mib * 2**20 // per_unit)
    torch.manual_seed(0)
    t5 = T5EncoderModel(config).to(torch.bfloat16)
    model = FluxModel(
        flavour="tiny",
        transformer=parts["transformer"].to(torch.bfloat16),
        vae=parts["vae"].to(torch.bfloat16),
        text_encoders=[parts["text_encoder"].to(torch.bfloat16), t5],
        tokenizers=[parts["tokenizer"], parts["tokenizer_2"]],
        noise_scheduler=parts["scheduler"],
        dtype=torch.bfloat16,
    )
    model.save_pretrained(folder)
    return {
        "text_encoders_mib": round(sum(module_bytes(m) for m in model.text_encoders) / 2**20, 1),
        "transformer_mib": round(module_bytes(model.transformer) / 2**20, 1),
        "vae_mib": round(module_bytes(model.vae) / 2**20, 1),
    }


def child(mode: str, config: str, model_dir: str, steps: int) -> None:
    """One training run in this process; prints {"mode", "rss_mib": [after each step]} as JSON."""
    from tunegraph.trainer.models.prepare import prepare_model
    from tunegraph.trainer.training.loop import train

    overrides = {
        "pretrained_model_name_or_path": model_dir,
        "model_flavour": None,
        "mixed_precision": "bf16",
        "max_train_steps": steps,
        "eval_steps_interval": None,
        "checkpoint_step_interval": None,
        "validation_step_interval": None,
        "disable_validation": True,
        "output_dir": str(Path(config).parent.parent / f"out-{mode}"),
    }
    cfg = load_config(config, overrides)
    samples: list[float] = []
    model = prepare_model(cfg, "cpu") if mode == "held" else None
    train(cfg, model=model, progress=False, on_step=lambda *_: samples.append(rss_mib()))
    print(json.dumps({"mode": mode, "rss_mib": [round(s, 1) for s in samples]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--t5-mib", type=int, default=512)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", nargs=3, metavar=("MODE", "CONFIG", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child, args.steps)
    with tempfile.TemporaryDirectory() as tmp:
        sizes = write_model(Path(tmp) / "model", args.t5_mib)
        config = write_demo_config(Path(tmp) / "demo", steps=args.steps)
        runs = {}
        for mode in ("held", "phased"):
            cmd = [sys.executable, __file__, "--steps", str(args.steps), "--child", mode, str(config)]
            out = subprocess.run([*cmd, str(Path(tmp) / "model")], capture_output=True, text=True, check=True)
            runs[mode] = json.loads(out.stdout.strip().splitlines()[-1])["rss_mib"]
    result = {
        **sizes,
        "held_rss_mib": max(runs["held"]),
        "phased_rss_mib": max(runs["phased"]),
        "drop_mib": round(max(runs["held"]) - max(runs["phased"]), 1),
        "per_step": runs,
    }
    if args.json:
        print(json.dumps(result))
        return
    print(
        f"text encoders {result['text_encoders_mib']} MiB (transformer {result['transformer_mib']}, "
        f"VAE {result['vae_mib']}); peak RSS during steps: held {result['held_rss_mib']} MiB, "
        f"phased {result['phased_rss_mib']} MiB, drop {result['drop_mib']} MiB"
    )


if __name__ == "__main__":
    main()
