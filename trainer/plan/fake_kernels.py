"""Make a fake-tensor forward keep what the real device's kernels keep.

Fake tensors carry shapes, dtypes and a device but no data, so a full-size model runs on a CPU-only
machine at no memory cost. Three things differ from a real run unless fixed here:

- Attention: a fake CUDA tensor cannot ask the GPU which fused kernel to use, so PyTorch falls back
  to the math path (which keeps the [heads, N, N] score matrix). On CUDA we call the flash kernel
  (the mem-efficient one where a mask is given) explicitly; both keep q, k, v, out and a float32
  log-sum-exp. On CPU the real CPU choice already applies.
- Autocast: `torch.autocast("cuda")` refuses to start without a GPU; its dispatch keys work on fake
  CUDA tensors, so we switch it on directly, exactly as the context manager does.
- LayerNorm statistics: CPU kernels return mean/rstd in the input dtype (bf16), the meta kernel in
  float32 (as CUDA does); for a CPU target they are cast back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

_REDUCED = (torch.bfloat16, torch.float16)


def _cuda_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
    """What F.scaled_dot_product_attention runs on an Ampere+ GPU, called by name."""
    if kw.get("enable_gqa"):
        raise NotImplementedError("grouped-query attention is not modelled")
    if attn_mask is None and query.shape[-1] <= 256:
        out = torch.ops.aten._scaled_dot_product_flash_attention(
            query, key, value, dropout_p, is_causal, False, scale=scale
        )
        return out[0]
    out = torch.ops.aten._scaled_dot_product_efficient_attention(
        query, key, value, attn_mask, True, dropout_p, is_causal, scale=scale
    )
    return out[0]


class _CpuStats(TorchDispatchMode):
    """native_layer_norm on a CPU target: mean and rstd in the input's (reduced) dtype."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.native_layer_norm.default and args[0].dtype in _REDUCED:
            return out[0], out[1].to(args[0].dtype), out[2].to(args[0].dtype)
        return out


@contextlib.contextmanager
def _cuda_autocast(dtype: torch.dtype) -> Iterator[None]:
    was, was_dtype = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", dtype)
    torch.autocast_increment_nesting()
    try:
        yield
    finally:
        if torch.autocast_decrement_nesting() == 0:
            torch.clear_autocast_cache()
        torch.set_autocast_enabled("cuda", was)
        torch.set_autocast_dtype("cuda", was_dtype)


@contextlib.contextmanager
def target_kernels(target: str, autocast_dtype: torch.dtype | None) -> Iterator[None]:
    """Inside a FakeTensorMode: run as on `target` ("cuda" | "cpu"), under autocast when given."""
    with contextlib.ExitStack() as stack:
        if target == "cuda":
            original = F.scaled_dot_product_attention
            F.scaled_dot_product_attention = _cuda_attention
            stack.callback(setattr, F, "scaled_dot_product_attention", original)
            if autocast_dtype is not None:
                stack.enter_context(_cuda_autocast(autocast_dtype))
        else:
            stack.enter_context(_CpuStats())
            if autocast_dtype is not None:
                stack.enter_context(torch.autocast("cpu", dtype=autocast_dtype))
        yield
