"""The `tunegraph bench` arguments and what the command does with them."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .cases import FAMILIES, FULL_RESOLUTIONS, PRECISIONS, SMOKE_PRECISIONS, SMOKE_RESOLUTIONS, grid


def add_arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--smoke", action="store_true", help="tiny models on the CPU (seconds): the CI mode")
    sp.add_argument("--family", dest="families", action="append", choices=FAMILIES, help="repeatable")
    sp.add_argument("--resolution", dest="resolutions", action="append", type=int, help="px, repeatable")
    sp.add_argument("--precision", dest="precisions", action="append", choices=PRECISIONS, help="repeatable")
    sp.add_argument("--checkpointing", choices=("yes", "no", "both"), default="both")
    sp.add_argument("--bypass", action="store_true", help="LoKr in bypass mode on bf16 bases too")
    sp.add_argument("--warmup", type=int, default=None, help="untimed steps (default 3; smoke 1)")
    sp.add_argument("--steps", type=int, default=None, help="timed steps (default 5; smoke 1)")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    sp.add_argument("--peak-tflops", type=float, default=None, help="peak bf16 TFLOP/s for MFU")
    sp.add_argument("--out", default=None, help="folder for bench.md and bench.json")
    sp.add_argument("--device-command", action="store_true", help="print the GPU-session commands and exit")


def cmd_bench(args: argparse.Namespace) -> dict[str, Any]:
    from .runner import run_bench
    from .table import device_commands, markdown_table

    if args.device_command:
        print(device_commands())
        return {"device_command": device_commands()}
    default_res = SMOKE_RESOLUTIONS if args.smoke else FULL_RESOLUTIONS
    ckpt = {"yes": (True,), "no": (False,), "both": (True, False)}[args.checkpointing]
    for r in args.resolutions or ():
        if r <= 0 or r % 16:
            raise ConfigError(f"bench --resolution {r}: must be a positive multiple of 16 px")
    cases = grid(
        tuple(args.families or FAMILIES),
        tuple(args.resolutions or default_res),
        tuple(args.precisions or (SMOKE_PRECISIONS if args.smoke else PRECISIONS)),
        ckpt,
    )
    result = run_bench(
        cases,
        smoke=args.smoke,
        device=args.device or ("cpu" if args.smoke else None),
        warmup=args.warmup if args.warmup is not None else (1 if args.smoke else 3),
        steps=args.steps if args.steps is not None else (1 if args.smoke else 5),
        seed=args.seed,
        bypass=args.bypass,
        peak=args.peak_tflops,
    )
    table = markdown_table(result)
    print(table, flush=True)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench.md").write_text(table + "\n")
        (out / "bench.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(f"{len(result['rows'])} cases measured", file=sys.stderr)
    return result
