"""TrainLoKr's memory widgets: a card-size preset and the plan check's override (trainer/plan/)."""

from __future__ import annotations

from typing import Any

from comfy_api.latest import io

from ..trainer.plan.presets import PRESET_OFF, PRESETS, apply_memory_preset, memory_settings, widget_keys


def memory_inputs() -> list[Any]:
    return [
        io.Combo.Input(
            "memory_preset",
            options=[PRESET_OFF, *(f"{p} GB" for p in PRESETS)],
            default=PRESET_OFF,
            optional=True,
            tooltip="the GPU's memory: the memory plan picks precision, gradient checkpointing and group "
            "offload to fit it, and checks the run fits before training",
        ),
        io.Boolean.Input(
            "ignore_memory_plan",
            default=False,
            optional=True,
            tooltip="train even when the memory plan says the run will not fit the GPU",
        ),
    ]


def memory_keys(v: dict[str, Any]) -> dict[str, Any]:
    """Widget values -> config keys (memory_preset, ignore_memory_plan)."""
    return widget_keys(v.get("memory_preset"), v.get("ignore_memory_plan", False))


def preset_settings(cfg: Any) -> tuple[Any, dict[str, Any]]:
    """(cfg with the preset applied, the memory settings for the live panel's events)."""
    cfg = apply_memory_preset(cfg)
    return cfg, memory_settings(cfg)
