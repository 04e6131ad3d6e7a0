"""When a plan does not fit: the cheapest changes that would make it fit, in order, each re-planned.

Order (cheapest in quality and speed first): the VAE off the device while training steps run,
gradient checkpointing, an int8 base, text encoders quantised for the cache fill, group offload of
the frozen transformer, a smaller bucket. Each step keeps the earlier ones, so the list reads as a
path from the current settings to a fit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .estimate import MemoryPlan, build_plan
from .inputs import PlanInputs


@dataclass(frozen=True)
class Change:
    what: str  # in the user's words
    keys: dict[str, Any]  # config keys that make it
    plan: MemoryPlan


def _steps(inp: PlanInputs) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(description, config keys, PlanInputs changes) for every change not already in effect."""
    steps = []
    if inp.vae_in_training:  # costs only startup time: the latents are the same
        steps.append(
            (
                "let the VAE leave the device after caching (vae_cache_ondemand / vae_cache_disable off, "
                "also on datasets)",
                {"vae_cache_ondemand": False, "vae_cache_disable": False, "keep_vae_loaded": False},
                {"vae_in_training": False, "vae_encodes_in_training": False},
            )
        )
    if not inp.checkpointing:
        steps.append(
            ("turn on gradient checkpointing", {"gradient_checkpointing": True}, {"checkpointing": True})
        )
    if inp.base_precision == "no_change":
        steps.append(
            (
                "train on an int8 base, quantised in host RAM",
                {"base_model_precision": "int8-torchao", "quantize_via": "cpu"},
                {"base_precision": "int8-torchao", "quantize_via": "cpu"},
            )
        )
    big = [
        i for i, p in enumerate(inp.encoder_precisions) if p == "no_change" and inp.encoder_params[i] > 1e9
    ]
    if big:
        keys = {f"text_encoder_{i + 1}_precision": "int8-quanto" for i in big}
        precisions = [("int8-quanto" if i in big else p) for i, p in enumerate(inp.encoder_precisions)]
        steps.append(
            ("quantise the large text encoders for the cache fill", keys, {"encoder_precisions": precisions})
        )
    if not inp.group_offload:
        go = {"type": "block_level", "blocks_per_group": 1, "use_stream": True, "to_disk": False}
        keys = {
            "enable_group_offload": True,
            "group_offload_type": "block_level",
            "group_offload_blocks_per_group": 1,
            "group_offload_use_stream": True,
        }
        steps.append(("offload the frozen transformer by block groups", keys, {"group_offload": go}))
    w, h = inp.bucket_px
    if w * h > 512 * 512:
        steps.append(("train at 512 px", {"resolution": 512}, {"bucket_px": (512, 512)}))
    return steps


def cheapest_fit(inp: PlanInputs, cfg: Any, budget: int, target: str = "cuda") -> list[Change]:
    """Changes in order, each with its new plan, up to the first that fits (all if none does)."""
    out: list[Change] = []
    current = inp
    for what, keys, changes in _steps(inp):
        current = current.with_changes(**changes)
        plan = build_plan(current, cfg, target)
        out.append(Change(what, keys, plan))
        if plan.fits(budget):
            break
    return out
