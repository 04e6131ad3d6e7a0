"""Leave a shared transformer as it was found after training or sampling with an adapter on it.

ComfyUI caches LoadTrainingModel's output and hands the same model to every node and every later
prompt, but attaching an adapter changes the transformer in place: LyCORIS replaces Linear
`forward`s, PEFT swaps modules for LoRA wrappers. `clean_transformer` records the module tree and
instance-level forwards first and puts both back afterwards, whatever happened in between.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

_PEFT_ATTRS = ("peft_config", "_hf_peft_config_loaded")


@contextlib.contextmanager
def clean_transformer(transformer: torch.nn.Module) -> Iterator[torch.nn.Module]:
    modules = dict(transformer.named_modules())
    forwards = {name: m.__dict__.get("forward") for name, m in modules.items()}
    flags = {name: m.training for name, m in modules.items()}
    grads = {name: p.requires_grad for name, p in transformer.named_parameters()}
    attrs = {a: transformer.__dict__[a] for a in _PEFT_ATTRS if a in transformer.__dict__}
    try:
        yield transformer
    finally:
        for name, module in modules.items():
            if name:  # parents hold their original children again (PEFT swapped some)
                head, _, leaf = name.rpartition(".")
                parent = modules[head]
                if parent._modules.get(leaf) is not module:
                    parent._modules[leaf] = module
        for name, module in modules.items():
            if forwards[name] is None:
                module.__dict__.pop("forward", None)
            else:
                module.__dict__["forward"] = forwards[name]
            module.training = flags[name]
        for name, p in transformer.named_parameters():
            p.requires_grad_(grads.get(name, False))
        for a in _PEFT_ATTRS:
            transformer.__dict__.pop(a, None)
        transformer.__dict__.update(attrs)
