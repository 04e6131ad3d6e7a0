"""`memory_preset` (12 | 16 | 24 | 48 | 80 GB): settings picked by the plan to fit that card.

The preset starts from the config as written and takes the plan's cheapest changes in order
(advice.py: gradient checkpointing, an int8 base, int8 text encoders, group offload) until the
plan fits; it never changes the resolution or batch the user asked for. The chosen settings go
into the run's config (so resume and the config hash see them), its summary and the node's events.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..choices import MEMORY_PRESETS
from .advice import cheapest_fit
from .estimate import GiB, build_plan
from .inputs import plan_inputs

log = logging.getLogger("tunegraph")

PRESETS = MEMORY_PRESETS
PRESET_OFF = "as configured"  # TrainLoKr's widget label for no preset; the others read "<N> GB"
_PICKED = (
    "gradient_checkpointing",
    "base_model_precision",
    "enable_group_offload",
    "group_offload_type",
    "group_offload_blocks_per_group",
    "group_offload_use_stream",
    *(f"text_encoder_{i}_precision" for i in range(1, 5)),
)


def apply_memory_preset(cfg: Any, target: str | None = None) -> Any:
    """`cfg` with the preset's settings (unchanged without a preset). The plan's budget becomes
    the preset's size unless gpu_memory says otherwise. Kernels: this machine's (default)."""
    target = target or default_target()
    preset = getattr(cfg, "memory_preset", None)
    if not preset:
        return cfg
    budget_gib = float(cfg.gpu_memory or preset)
    budget = int(budget_gib * GiB)
    plan = build_plan(plan_inputs(cfg), cfg, target)
    keys: dict[str, Any] = {}
    if not plan.fits(budget):
        for change in cheapest_fit(plan.inputs, cfg, budget, target):
            if "resolution" in change.keys:
                break
            keys.update(change.keys)
            plan = change.plan
    if keys.get("group_offload_use_stream") and not torch.cuda.is_available():  # streams need CUDA
        keys["group_offload_use_stream"] = False
    out = cfg.replace(gpu_memory=budget_gib, **keys)
    verdict = (
        "fits" if plan.fits(budget) else "still does not fit (the plan check will say what else to change)"
    )
    log.info(
        "memory_preset %s GB: %s; peak %.2f GiB %s",
        preset,
        memory_settings(out),
        plan.peak.device / GiB,
        verdict,
    )
    return out


def default_target() -> str:
    """Plan for the kernels this machine trains with (fake CUDA tensors need no GPU, but some hosts,
    ComfyUI in --cpu mode among them, refuse any CUDA call)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def memory_settings(cfg: Any) -> dict[str, Any]:
    """The memory-relevant settings a run trains with (for its summary, metrics and events)."""
    out = {"memory_preset": getattr(cfg, "memory_preset", None), "mixed_precision": cfg.mixed_precision}
    out.update(
        {
            k: getattr(cfg, k)
            for k in _PICKED
            if not k.startswith("group_offload_") or cfg.enable_group_offload
        }
    )
    return out


def widget_keys(label: str | None, ignore_plan: bool = False) -> dict[str, Any]:
    """TrainLoKr's widget values ("16 GB" | "as configured", a bool) -> config keys."""
    label = label or PRESET_OFF
    return {
        "memory_preset": None if label == PRESET_OFF else label.split()[0],
        "ignore_memory_plan": bool(ignore_plan),
    }
