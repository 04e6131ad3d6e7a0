"""Optimizers, learning-rate schedules and gradient clipping, named as in SimpleTuner configs.

Optimizer defaults follow SimpleTuner's table. The AdamW family (adamw, adamw_bf16, bnb-adamw8bit)
takes adam_beta1/2, adam_weight_decay and adam_epsilon from the config; the others use their own
defaults. `optimizer_config: "key=value,key=value"` overrides either, checked against the class.

adamw_bf16 is optimi's AdamW with Kahan summation switched on automatically for bf16 parameters
(the job SimpleTuner's AdamWBF16 does with stochastic rounding); on fp32 parameters it is plain AdamW.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

from ..choices import CLIP_METHODS, LR_SCHEDULERS
from ..config import did_you_mean
from ..errors import ConfigError, TrainingError

_BNB = {"bnb-lion8bit": "Lion8bit", "bnb-lion8bit-paged": "PagedLion8bit", "bnb-adamw8bit": "AdamW8bit"}
OPTIMIZERS = ("adamw", "adamw_bf16", "optimi-lion", "optimi-stableadamw", "prodigy", *_BNB)
SCHEDULERS = LR_SCHEDULERS


def _adam_settings(cfg: Any) -> dict[str, Any]:
    return {
        "betas": (cfg.adam_beta1, cfg.adam_beta2),
        "weight_decay": cfg.adam_weight_decay,
        "eps": cfg.adam_epsilon,
    }


def _optimizer_class(name: str) -> type:
    if name == "adamw":
        return torch.optim.AdamW
    if name in ("adamw_bf16", "optimi-lion", "optimi-stableadamw"):
        import optimi

        return {
            "adamw_bf16": optimi.AdamW,
            "optimi-lion": optimi.Lion,
            "optimi-stableadamw": optimi.StableAdamW,
        }[name]
    if name == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise TrainingError(
            f"optimizer '{name}' needs bitsandbytes and a CUDA GPU: `pip install bitsandbytes`, "
            "or pick optimi-lion / adamw_bf16, which run anywhere"
        ) from None
    return getattr(bnb.optim, _BNB[name])


def _defaults(name: str, cfg: Any) -> dict[str, Any]:
    if name in ("adamw", "adamw_bf16", "bnb-adamw8bit"):
        return _adam_settings(cfg)
    if name in ("optimi-lion", "bnb-lion8bit", "bnb-lion8bit-paged"):
        return {"betas": (0.9, 0.99), "weight_decay": 0.0}
    if name == "optimi-stableadamw":
        return {"betas": (0.9, 0.99), "weight_decay": 1e-2, "eps": 1e-6}
    return {"betas": (0.9, 0.99), "weight_decay": 0.0, "d_coef": cfg.prodigy_d_coef}  # prodigy


def parse_optimizer_config(text: str | None, where: str = "optimizer_config") -> dict[str, Any]:
    """SimpleTuner's "key=value,key=value" string; values become bool / None / int / float / tuple."""
    if not text or not str(text).strip():
        return {}
    out: dict[str, Any] = {}
    for part in _split_top_level(str(text)):
        if "=" not in part:
            raise ConfigError(
                f"{where}: '{part}' is not key=value (write e.g. \"weight_decay=0.01,eps=1e-8\")"
            )
        key, value = (s.strip() for s in part.split("=", 1))
        out[key] = _parse_value(value)
    return out


def _split_top_level(text: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return [p.strip() for p in parts + [cur] if p.strip()]


def _parse_value(value: str) -> Any:
    low = value.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    if value[:1] in "([" and value[-1:] in ")]":
        return tuple(_parse_value(v) for v in _split_top_level(value[1:-1]))
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def _check_params(params: list[torch.nn.Parameter], name: str) -> None:
    if not params:
        raise TrainingError("the optimizer got no trainable parameters: the adapter wraps no module")
    if name in _BNB and not all(p.is_cuda for p in params):
        raise TrainingError(
            f"optimizer '{name}' (bitsandbytes 8-bit) needs the parameters on a CUDA GPU; "
            "on this device use optimi-lion or adamw_bf16"
        )


def build_optimizer(cfg: Any, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """The optimizer `cfg.optimizer` names, over `params`, at `cfg.learning_rate`."""
    name = (cfg.optimizer or "adamw_bf16").lower()
    if name not in OPTIMIZERS:
        hint = did_you_mean(name, OPTIMIZERS, cutoff=0.5)
        raise ConfigError(
            f"{cfg.source}: optimizer '{cfg.optimizer}' is not one of {', '.join(OPTIMIZERS)}{hint}"
        )
    lr = cfg.learning_rate
    if lr is None or lr <= 0:
        raise ConfigError(f"{cfg.source}: key 'learning_rate' must be > 0, got {lr}")
    params = list(params)
    cls = _optimizer_class(name)
    _check_params(params, name)
    settings = {
        **_defaults(name, cfg),
        **parse_optimizer_config(cfg.optimizer_config, f"{cfg.source}: optimizer_config"),
    }
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "params", "lr")]
    for key in settings:
        if key not in accepted:
            raise ConfigError(
                f"{cfg.source}: optimizer_config key '{key}' is not an option of {name}; it takes {', '.join(accepted)}"
            )
    if cls.__module__.startswith("optimi") and not all(p.is_cuda for p in params):
        # optimi 0.3.3's StableAdamW picks its Triton kernel from an empty list, even on CPU
        settings.setdefault("triton", False)
    return cls(params, lr=lr, **settings)


def _warmup(step: int, warmup: int) -> float | None:
    return step / max(1, warmup) if step < warmup else None


def schedule_factor(
    name: str, step: int, warmup: int, total: int, lr: float, lr_end: float, power: float
) -> float:
    """The multiplier of the base learning rate after `step` optimizer steps."""
    if name == "constant":
        return 1.0
    ramp = _warmup(step, warmup)
    if ramp is not None:
        return ramp
    if name == "constant_with_warmup":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if name == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return ((lr - lr_end) * (1.0 - progress) ** power + lr_end) / lr  # polynomial


def build_scheduler(cfg: Any, optimizer: torch.optim.Optimizer, total_steps: int) -> LambdaLR:
    """constant | constant_with_warmup | cosine | polynomial, with lr_warmup_steps of linear
    warmup from 0 (none for constant). Cosine falls to 0 at total_steps; polynomial to lr_end."""
    name = (cfg.lr_scheduler or "constant").lower()
    if name not in SCHEDULERS:
        hint = did_you_mean(name, SCHEDULERS, cutoff=0.5)
        raise ConfigError(
            f"{cfg.source}: lr_scheduler '{cfg.lr_scheduler}' is not one of {', '.join(SCHEDULERS)}{hint}"
        )
    warmup, lr = int(cfg.lr_warmup_steps or 0), float(cfg.learning_rate)
    lr_end, power = float(cfg.lr_end), float(cfg.lr_power)
    if name == "polynomial" and not lr > lr_end:
        raise ConfigError(f"{cfg.source}: lr_end ({lr_end}) must be smaller than learning_rate ({lr})")

    def factor(step: int) -> float:
        return schedule_factor(name, step, warmup, int(total_steps), lr, lr_end, power)

    return LambdaLR(optimizer, factor)


def clip_gradients(
    params: Iterable[torch.nn.Parameter], max_grad_norm: float | None, method: str = "norm"
) -> float:
    """Clip gradients in place by total norm or per value; returns the total norm before clipping."""
    if method not in CLIP_METHODS:
        raise ConfigError(f"grad_clip_method '{method}' is not one of {', '.join(CLIP_METHODS)}")
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return 0.0
    total = torch.nn.utils.get_total_norm([p.grad for p in grads])
    if max_grad_norm is not None and max_grad_norm > 0:
        if method == "norm":
            torch.nn.utils.clip_grads_with_norm_(grads, max_grad_norm, total)
        else:
            torch.nn.utils.clip_grad_value_(grads, max_grad_norm)
    return float(total)
