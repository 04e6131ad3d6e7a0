"""Memory and error of every base_model_precision on a mid-size random Flux transformer.

    .venv/bin/python benchmarks/quant_memory.py [--width 512] [--blocks 2] [--json]

The tiny test model is so small that per-channel scales and the unquantised embedders dominate its
bytes; this builds a random FluxTransformer2DModel of `--width` (heads of 64) with `--blocks` double
and single blocks, quantises it as `quantize_model` does (Flux's kept layers stay bf16), and prints
parameter+buffer bytes against bf16, the relative L2 error of one forward against bf16, and CPU
seconds for one LoKr (bypass) forward+backward (best of two after a warm-up). Not a test: timings move with the machine.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from diffusers import FluxTransformer2DModel

from tunegraph.trainer.adapters.lycoris import lycoris_from_config
from tunegraph.trainer.choices import PRECISIONS
from tunegraph.trainer.quantize import KEEP, module_bytes, quantize_module

LOKR = {"algo": "lokr", "factor": 16, "linear_dim": 10000, "linear_alpha": 1, "full_matrix": True,
        "apply_preset": {"target_module": ["Attention"]}}  # fmt: skip


def build(width: int, blocks: int) -> FluxTransformer2DModel:
    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        in_channels=64,
        num_layers=blocks,
        num_single_layers=blocks,
        attention_head_dim=64,
        num_attention_heads=width // 64,
        joint_attention_dim=width,
        pooled_projection_dim=width // 2,
        guidance_embeds=True,
        axes_dims_rope=(16, 24, 24),
    )
    return torch.nn.Module.to(model, dtype=torch.bfloat16).requires_grad_(False)


def inputs(width: int, tokens: int = 256, text: int = 64) -> dict:
    g = torch.Generator().manual_seed(1)
    side = int(tokens**0.5)
    ids = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).reshape(
        -1, 2
    )
    return {
        "hidden_states": torch.randn(1, tokens, 64, generator=g).bfloat16(),
        "encoder_hidden_states": torch.randn(1, text, width, generator=g).bfloat16(),
        "pooled_projections": torch.randn(1, width // 2, generator=g).bfloat16(),
        "timestep": torch.tensor([0.5]).bfloat16(),
        "img_ids": torch.cat([torch.zeros(tokens, 1), ids.float()], 1),
        "txt_ids": torch.zeros(text, 3),
        "guidance": torch.tensor([1.0]),
    }


def step_seconds(model: FluxTransformer2DModel, x: dict) -> float:
    adapter = lycoris_from_config(model, LOKR)
    for p in adapter.parameters():
        torch.nn.init.normal_(p, std=1e-3)
    times = []
    for _ in range(3):  # the first call warms up kernels and allocations; report the best of the rest
        t0 = time.perf_counter()
        model(**x, return_dict=False)[0].float().square().mean().backward()
        times.append(time.perf_counter() - t0)
    seconds = min(times[1:])
    adapter.remove()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    x = inputs(args.width)
    rows = []
    ref = None
    for precision in PRECISIONS:
        model = build(args.width, args.blocks)
        quantize_module(model, precision, keep=KEEP["flux"])
        with torch.no_grad():
            out = model(**x, return_dict=False)[0].float()
        ref = out if ref is None else ref
        base = rows[0]["bytes"] if rows else module_bytes(model)
        rows.append(
            {
                "precision": precision,
                "bytes": module_bytes(model),
                "ratio": round(module_bytes(model) / base, 4),
                "rel_err": round(((out - ref).norm() / ref.norm()).item(), 5),
                "lokr_step_s": round(step_seconds(model, x), 3),
            }
        )
    params = sum(p.numel() for p in build(args.width, args.blocks).parameters())
    if args.json:
        print(json.dumps({"width": args.width, "blocks": args.blocks, "params": params, "rows": rows}))
        return
    print(f"Flux width {args.width}, {args.blocks}+{args.blocks} blocks, {params / 1e6:.1f} M params")
    print(f"{'precision':<14}{'MiB':>9}{'vs bf16':>9}{'rel err':>10}{'LoKr s':>9}")
    for r in rows:
        mib = r["bytes"] / 2**20
        print(
            f"{r['precision']:<14}{mib:>9.2f}{r['ratio']:>9.3f}{r['rel_err']:>10.4f}{r['lokr_step_s']:>9.3f}"
        )


if __name__ == "__main__":
    main()
