"""The one warning for real SimpleTuner keys a config sets that TuneGraph does not act on.

Each key is named with what TuneGraph does instead: trains as with SimpleTuner's default, runs
without a memory/speed option (same weights), or skips it for flow matching as SimpleTuner does.
Keys that cannot change a local run (hub upload, trackers, webhooks) are only logged at info level.
"""

from __future__ import annotations

import logging
from typing import Any

from .config_keys import FLOW_NOOPS, IGNORED, SPEED_MEMORY, UNSUPPORTED

log = logging.getLogger("tunegraph")


def is_noop(value: Any, noop: Any) -> bool:
    """Whether `value` leaves SimpleTuner's behaviour unchanged (its default, or off)."""
    if value is None or value == noop or (value is False and noop is None):
        return True
    if isinstance(value, (list, dict)) and not value:
        return True
    if isinstance(value, str) and value.strip().lower() in {"", "none", "false", "0", "0.0", "null"}:
        return noop in (None, False, 0, 0.0) or str(noop).lower() == value.strip().lower()
    return False


class Unacted:
    """Collects the SimpleTuner keys of one config file that TuneGraph accepts but does not act on."""

    def __init__(self, source: str):
        self.source = source
        self.default: list[str] = []
        self.speed: list[str] = []
        self.flow: list[str] = []
        self.quiet: list[str] = []

    def take(self, name: str, value: Any) -> bool:
        """True when `name` is such a key (then it is recorded, if set to something that matters)."""
        if name in IGNORED:
            self.quiet.append(name)
            return True
        if name not in UNSUPPORTED:
            return False
        if is_noop(value, UNSUPPORTED[name]):
            return True
        item = f"{name}={value!r}"
        if name in FLOW_NOOPS:
            self.flow.append(item)
        elif name in SPEED_MEMORY:
            self.speed.append(item)
        else:
            self.default.append(f"{item} (trains as with its default {UNSUPPORTED[name]!r})")
        return True

    def warning(self) -> str | None:
        parts = list(self.default)
        if self.speed:
            parts.append("memory/speed only, the trained weights are the same: " + ", ".join(self.speed))
        if self.flow:
            parts.append(
                "not applied to flow-matching models (Flux, HiDream), as in SimpleTuner: "
                + ", ".join(self.flow)
            )
        if self.quiet:
            log.info(
                "%s: keys with no effect on a local run, ignored: %s", self.source, ", ".join(self.quiet)
            )
        if not parts:
            return None
        return f"{self.source}: SimpleTuner keys not implemented by TuneGraph, ignored: " + "; ".join(parts)


def key_groups() -> dict[str, list[str]]:
    """SimpleTuner's config keys TuneGraph does not act on, by what happens to them instead."""
    groups: dict[str, list[str]] = {"flow_matching_noop": [], "speed_memory": [], "not_implemented": []}
    for name in sorted(UNSUPPORTED):
        group = (
            "flow_matching_noop" if name in FLOW_NOOPS else "speed_memory" if name in SPEED_MEMORY else None
        )
        groups[group or "not_implemented"].append(name)
    groups["no_effect_on_a_local_run"] = sorted(IGNORED)
    return groups


if __name__ == "__main__":  # python -m tunegraph.trainer.config_notes: the lists the README summarises
    for title, names in key_groups().items():
        print(f"{title} ({len(names)}): {', '.join(names)}\n")
