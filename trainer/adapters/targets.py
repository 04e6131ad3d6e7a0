"""Which modules an adapter wraps: family facts, Flux LoRA presets, and errors that list what exists.

`family_info` is the model family (a `trainer/models` ModelBundle or its class), or a dict. We read
`attention_classes` (or `lycoris_attention_classes`) and `lora_target_presets` from it and fall
back to Flux's values when it does not name them.
"""

from __future__ import annotations

import fnmatch
import re
from typing import Any

import torch

from ..choices import FLUX_LORA_TARGET_PRESETS
from ..errors import ConfigError

FLUX_ATTENTION_CLASSES = ["FluxAttention"]


def family_value(family_info: Any, name: str, default: Any) -> Any:
    """Read `name` from a family-info object or dict; `default` when it is absent or empty."""
    if family_info is None:
        return default
    value = family_info.get(name) if isinstance(family_info, dict) else getattr(family_info, name, None)
    return value if value else default


def attention_classes(family_info: Any) -> list[str]:
    """What `"Attention"` means in a LyCORIS preset (ModelBundle names it lycoris_attention_classes)."""
    named = family_value(family_info, "attention_classes", None)
    return list(named or family_value(family_info, "lycoris_attention_classes", FLUX_ATTENTION_CLASSES))


# issue 15: SimpleTuner's LyCORIS presets name the classes of its own model code. Its Flux code uses
# diffusers' Attention and FeedForward; its HiDream code defines Attention, FeedForward (the SwiGLU
# of every expert, shared and routed, and of the text stream) and MOEFeedForward. A family maps each
# such name to the diffusers classes in that role (`lycoris_class_aliases`); "Attention" always
# means the family's attention classes.
def class_aliases(family_info: Any) -> dict[str, list[str]]:
    """SimpleTuner class name -> the diffusers class names that play its role in this family."""
    aliases = {k: list(v) for k, v in family_value(family_info, "lycoris_class_aliases", {}).items()}
    aliases["Attention"] = attention_classes(family_info)
    return aliases


def lora_target_presets(family_info: Any) -> dict[str, list[str]]:
    return dict(family_value(family_info, "lora_target_presets", FLUX_LORA_TARGET_PRESETS))


def module_classes(model: torch.nn.Module) -> list[str]:
    """Sorted class names of every module in `model` (for error messages and matching)."""
    return sorted({type(m).__name__ for m in model.modules()})


def linear_names(model: torch.nn.Module, limit: int = 12) -> str:
    """A short sample of Linear module names, for 'matches nothing' errors."""
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def name_matches(pattern: str, name: str, use_fnmatch: bool) -> bool:
    """LyCORIS' own rule: fnmatch when use_fnmatch, else re.match from the start of the name."""
    if use_fnmatch:
        return fnmatch.fnmatch(name, pattern)
    return pattern == name or bool(re.match(pattern, name))


def suffix_matches(target: str, name: str) -> bool:
    """PEFT's rule for a plain target-module name: the full name or its dotted suffix."""
    return name == target or name.endswith("." + target)


def no_match_error(what: str, entries: list[str], model: torch.nn.Module, source: str) -> ConfigError:
    return ConfigError(
        f"{source}: {what} {', '.join(repr(e) for e in entries)} match no module of this model. "
        f"Module classes here: {', '.join(module_classes(model))}. "
        f"Linear layers here include: {linear_names(model)}. Fix the names or pick another target."
    )
