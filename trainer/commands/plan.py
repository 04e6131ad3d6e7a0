"""`tunegraph plan`: the memory plan for a config, per phase, before anything is loaded."""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import ConfigError


def add_arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--gpu-memory", type=float, metavar="GiB", help="device memory to check against")
    sp.add_argument(
        "--target", choices=("cuda", "cpu"), default="cuda", help="kernels to plan for (default cuda)"
    )


def cmd_plan(args: argparse.Namespace, cfg: Any) -> dict[str, Any]:
    from ..plan.advice import cheapest_fit
    from ..plan.check import format_plan, gib
    from ..plan.estimate import GiB, build_plan
    from ..plan.inputs import plan_inputs

    if args.gpu_memory is not None and args.gpu_memory <= 0:
        raise ConfigError(f"--gpu-memory must be a positive number of GiB, got {args.gpu_memory}")
    gpu = args.gpu_memory if args.gpu_memory is not None else cfg.gpu_memory
    budget = int(gpu * GiB) if gpu else None
    plan = build_plan(plan_inputs(cfg), cfg, args.target)
    changes = cheapest_fit(plan.inputs, cfg, budget, args.target) if budget and not plan.fits(budget) else []
    text = format_plan(plan, budget, changes)
    if args.json:
        import sys

        print(text, file=sys.stderr)
    else:
        print(text)
    summary = plan.to_dict()
    summary["peak_device"] = gib(plan.peak.device)
    if budget is not None:
        summary.update(
            budget_bytes=budget,
            fits=plan.fits(budget),
            changes=[
                {
                    "change": c.what,
                    "keys": c.keys,
                    "peak_device_bytes": c.plan.peak.device,
                    "fits": c.plan.fits(budget),
                }
                for c in changes
            ],
        )
    return summary
