"""The plan as text, and the fit check the CLI, prepare_run and TrainLoKr share (same words)."""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..errors import TrainingError
from .advice import Change, cheapest_fit
from .estimate import GiB, MemoryPlan, build_plan
from .inputs import plan_inputs

log = logging.getLogger("tunegraph")


class DoesNotFit(TrainingError):
    """The plan says the run will not fit the device memory (the text says what would)."""


def gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


def format_plan(plan: MemoryPlan, budget: int | None = None, changes: list[Change] | None = None) -> str:
    s = plan.settings
    lines = [
        f"memory plan: {s['model']}, {s['precision']}, base {s['base_model_precision']}, "
        f"checkpointing {'on' if s['gradient_checkpointing'] else 'off'}, batch {s['train_batch_size']} "
        f"at {s['bucket']}, {s['optimizer']}"
        + (f", group offload {s['group_offload']}" if s["group_offload"] else ""),
    ]
    a = plan.activations
    lines.append(
        f"  activations (measured, fake tensors on {s['target']}): {gib(a.kept)} kept"
        + (f" + {gib(a.recompute)} recomputed per block" if a.recompute else "")
        + f" = {a.per_token / 1024:.1f} KiB per image token"
    )
    for phase in plan.phases:
        lines.append(f"  {phase.name}: device {gib(phase.device)}, host RAM {gib(phase.host)}")
        for p in phase.parts:
            if p.device or p.host:
                where = gib(p.device) if p.device else f"host {gib(p.host)}"
                lines.append(f"      {p.name}: {where}" + (f" ({p.note})" if p.note else ""))
    if budget is not None:
        verdict = "fits" if plan.fits(budget) else "does NOT fit"
        lines.append(f"  peak {gib(plan.peak.device)} ({plan.peak.name}) {verdict} in {gib(budget)}")
    for i, c in enumerate(changes or [], 1):
        keys = ", ".join(f"{k}={v}" for k, v in c.keys.items())
        ok = "fits" if budget is not None and c.plan.fits(budget) else "still too big"
        lines.append(f"  {i}. {c.what} ({keys}): peak {gib(c.plan.peak.device)} ({c.plan.peak.name}), {ok}")
    return "\n".join(lines)


def device_budget(cfg: Any, device: torch.device | str | None = None) -> int | None:
    """Bytes the plan checks against: `gpu_memory` (GiB) if set, else a CUDA device's total memory,
    else None (no check)."""
    if getattr(cfg, "gpu_memory", None):
        return int(float(cfg.gpu_memory) * GiB)
    device = torch.device(device or "cpu")
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(device).total_memory
    return None


def plan_for(cfg: Any, target: str | None = None) -> MemoryPlan:
    from .presets import default_target

    return build_plan(plan_inputs(cfg), cfg, target or default_target())


def check_memory(
    cfg: Any, device: torch.device | str | None = None, *, force: bool = False
) -> MemoryPlan | None:
    """Before anything heavy loads: plan the run and raise DoesNotFit (with the cheapest changes
    that would fit) when it will not fit the device. No device figure known: no check."""
    budget = device_budget(cfg, device)
    if budget is None:
        return None
    plan = plan_for(cfg)
    if plan.fits(budget):
        log.info("memory plan: peak %s (%s) fits in %s", gib(plan.peak.device), plan.peak.name, gib(budget))
        return plan
    text = format_plan(plan, budget, cheapest_fit(plan.inputs, cfg, budget, plan.settings["target"]))
    if force or getattr(cfg, "ignore_memory_plan", False):
        log.warning("%s\ntraining anyway (ignore_memory_plan / force)", text)
        return plan
    raise DoesNotFit(
        f"{getattr(cfg, 'source', 'config')}: this run will not fit the device memory.\n{text}\n"
        "Apply one of the changes above, or set ignore_memory_plan (CLI: --set ignore_memory_plan=true; "
        "TrainLoKr: the ignore_memory_plan widget) to try anyway."
    )
