"""Optimizer state bytes per trainable parameter, as each optimizer allocates it on its first step.

Checked against the real optimizers on CPU (tests/test_plan_memory.py) for those that run there;
the bitsandbytes 8-bit ones follow bitsandbytes' layout (one byte per state value, a float32
absmax per block of 256; tensors under 4096 values keep 32-bit state) and need a GPU to check.
"""

from __future__ import annotations

from collections.abc import Iterable

# state tensors of the parameter's dtype per parameter; optimi adds a Kahan buffer for bf16 params
_STATES = {
    "adamw": 2,
    "adamw_bf16": 2,
    "optimi-lion": 1,
    "optimi-stableadamw": 2,
    "prodigy": 4,  # exp_avg, exp_avg_sq, s, p0
}
_KAHAN = {"adamw_bf16", "optimi-lion", "optimi-stableadamw"}
_BNB_STATES = {"bnb-adamw8bit": 2, "bnb-lion8bit": 1, "bnb-lion8bit-paged": 1}


def state_bytes(name: str, numels: Iterable[int], param_bytes: int) -> int:
    """Optimizer state of parameters with `numels` values each, stored at `param_bytes` per value."""
    name = (name or "adamw_bf16").lower()
    total = 0
    for n in numels:
        if name in _BNB_STATES:
            k = _BNB_STATES[name]
            total += k * (n + 4 * -(-n // 256)) if n >= 4096 else k * 4 * n
            continue
        states = _STATES.get(name, 2) + (1 if name in _KAHAN and param_bytes == 2 else 0)
        total += states * n * (4 if name == "prodigy" and param_bytes == 4 else param_bytes)
    return total


def scalar_state_bytes(name: str, tensors: int, param_bytes: int) -> int:
    """Per-tensor scalars: torch AdamW's float32 `step`, StableAdamW's `eps_sq` (param dtype)."""
    name = (name or "").lower()
    return tensors * {"adamw": 4, "optimi-stableadamw": param_bytes}.get(name, 0)
