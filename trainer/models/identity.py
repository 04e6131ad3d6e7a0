"""Stable identity strings for loaded components, used as cache keys.

An id is a hash of the component's config (minus fields that change on save/load) and a cheap weight
fingerprint (sums of a few tensors), so the same weights give the same id in any process, whether
built in code or reloaded from a folder, and different weights give a different id.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

# Config fields that differ between an in-memory model and the same model reloaded from disk.
_VOLATILE = {"transformers_version", "architectures", "torch_dtype", "dtype", "output_attentions"}
_FINGERPRINT_TENSORS = 8


def _config_dict(module: Any) -> dict:
    config = getattr(module, "config", None)
    if config is None:
        return {}
    raw = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {k: v for k, v in raw.items() if not k.startswith("_") and k not in _VOLATILE}


@torch.no_grad()
def weight_fingerprint(module: torch.nn.Module) -> list:
    """Name, shape, sum and absolute sum of a few evenly spaced tensors (float64, so it is exact
    enough to tell seeds apart and identical for identical weights)."""
    state = module.state_dict()
    names = sorted(state)
    step = max(1, len(names) // _FINGERPRINT_TENSORS)
    prints = []
    for name in names[::step][:_FINGERPRINT_TENSORS] + names[-1:]:
        tensor = state[name]
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            prints.append([name, list(getattr(tensor, "shape", []))])
            continue
        t = tensor.detach().double()
        prints.append([name, list(t.shape), round(t.sum().item(), 6), round(t.abs().sum().item(), 6)])
    return [len(names), str(next(iter(state.values())).dtype) if state else "", prints]


def tokenizer_fingerprint(tokenizer: Any) -> list:
    vocab = sorted(tokenizer.get_vocab().items())
    blob = hashlib.sha256(json.dumps(vocab).encode()).hexdigest()
    return [type(tokenizer).__name__, int(min(tokenizer.model_max_length, 1 << 30)), blob]


def component_id(kind: str, modules: list, tokenizers: list = (), extra: Any = None) -> str:
    """`<kind>-<16 hex>` from the configs and weights of `modules` and the vocabularies of `tokenizers`."""
    parts = [[type(m).__name__, _config_dict(m), weight_fingerprint(m)] for m in modules]
    parts += [tokenizer_fingerprint(t) for t in tokenizers]
    blob = json.dumps([parts, extra], sort_keys=True, default=str).encode()
    return f"{kind}-{hashlib.sha256(blob).hexdigest()[:16]}"
