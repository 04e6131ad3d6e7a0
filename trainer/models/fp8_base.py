"""`base_model_precision: fp8-file`: train on an fp8 / scaled-fp8 ComfyUI file's own float8 weights.

The file's Linear weights stay float8 in memory (half of bf16; no full-precision copy is ever made);
each forward upcasts one layer's weight to the compute dtype (times its scaled-fp8 `scale_weight`),
exactly as ComfyUI's manual-cast and scaled-fp8 ops compute. quanto and torchao could hold fp8 too,
but only by re-quantising from a full-precision weight, and with their own per-channel scales, not
the file's. LyCORIS runs in bypass mode on top (adapters/lycoris.py counts `Fp8Linear` as quantised);
PEFT wraps it as any Linear. Non-Linear tensors (norms, the layers quantize.KEEP leaves alone) load
in the compute dtype.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .weights_file import FP8_DTYPES

FP8_FILE = "fp8-file"


class Fp8Linear(torch.nn.Linear):
    """A Linear whose weight is stored float8 (with an optional per-layer scale), computed by upcasting."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__(in_features, out_features, bias=bias, device="meta")
        self.register_buffer("scale", torch.ones((), dtype=torch.float32), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.to(x.dtype) * self.scale.to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, weight, bias)

    def _apply(self, fn: Any, recurse: bool = True) -> Fp8Linear:
        # `.to(dtype)` on the model must move the fp8 weight, never upcast it for good.
        stored = self.weight.data  # `_apply` replaces the Parameter's .data in place
        super()._apply(fn, recurse)
        if self.weight.dtype != stored.dtype:
            self.weight = torch.nn.Parameter(stored.to(self.weight.device), requires_grad=False)
        return self


def swap_fp8_linears(module: torch.nn.Module, names: set[str]) -> None:
    """Replace the Linear layers named in `names` (module paths) by meta-device Fp8Linear layers."""
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = module.get_submodule(parent) if parent else module
        old = getattr(owner, child)
        new = Fp8Linear(old.in_features, old.out_features, bias=old.bias is not None)
        new.weight.requires_grad_(False)
        setattr(owner, child, new)


def fp8_layers(module: torch.nn.Module, stored_dtype: Any, keep: tuple[str, ...]) -> set[str]:
    """Linear layers whose file weight is float8 (`stored_dtype(weight name)`), minus quantize.KEEP."""
    from ..quantize import kept

    return {
        n
        for n, m in module.named_modules()
        if type(m) is torch.nn.Linear and not kept(n, keep) and stored_dtype(f"{n}.weight") in FP8_DTYPES
    }


def check_fp8_device(device: torch.device | str, where: str) -> None:
    """Fail before loading when `device` cannot hold and upcast float8 tensors."""
    try:
        t = torch.ones(4, dtype=torch.float8_e4m3fn).to(device)
        (t.to(torch.bfloat16) * 2).sum().item()
    except Exception as e:  # any backend error: say what to do instead of a kernel trace
        raise ConfigError(
            f"{where}: base_model_precision '{FP8_FILE}' keeps the file's float8 weights, but device "
            f"'{device}' cannot hold float8 tensors ({type(e).__name__}: {str(e)[:200]}). Use base_model_precision "
            "no_change (the weights are upcast to bf16 at load) or int8-quanto, or a device with float8 support."
        ) from None


def not_fp8_file(where: str, name: str) -> ConfigError:
    return ConfigError(
        f"{where}: base_model_precision '{FP8_FILE}' needs an fp8 or scaled-fp8 diffusion-model file, and "
        f"{name} holds no float8 Linear weights; set base_model_precision to no_change or int8-quanto, "
        "or point the key at the fp8 file."
    )
