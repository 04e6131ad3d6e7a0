"""Frozen weight sizes without loading a weight: safetensors headers, or a meta-built model.

A safetensors file starts with an 8-byte header length and a JSON header naming every tensor's
dtype and shape, so a 24 GB file is sized by reading a few kB. Components without files (the tiny
flavour, or a plan made before download) are counted from a model built on the meta device, or,
for text encoders and the VAE, from their published parameter counts.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4}
DTYPE_BYTES.update({"I16": 2, "I8": 1, "U8": 1, "BOOL": 1})

# Parameter counts of the frozen helpers (published checkpoints), when no files are at hand.
HELPER_PARAMS = {
    "flux": {"text_encoder": 123_060_480, "text_encoder_2": 4_762_310_656, "vae": 83_819_683},
    "hidream": {
        "text_encoder": 123_650_304,
        "text_encoder_2": 694_659_840,
        "text_encoder_3": 4_762_310_656,
        "text_encoder_4": 8_030_261_248,
        "vae": 83_819_683,
    },
}

# Bytes per weight of a quantised Linear (data + scales), per precision. Per-channel scales are
# added exactly from the layer shapes; group scales as their share per weight.
QUANT_BYTES = {
    "int8-quanto": 1.0,
    "int8-torchao": 1.0,
    "fp8-quanto": 1.0,
    "fp8-torchao": 1.0,
    "int4-quanto": 0.5 + 4 / 128,  # bf16 scale + shift per group of 128
    "int2-quanto": 0.25 + 4 / 64,
    "nf4-bnb": 0.5 + 1 / 64 + 4 / (64 * 256),  # nested absmax: one byte per block of 64
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    numel: int
    bytes: int


def read_header(path: Path) -> list[TensorInfo]:
    """Tensor names, element counts and bytes from a safetensors file's header (no data read)."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > 100_000_000:
                raise ValueError("header too large")
            header = json.loads(f.read(length))
    except (OSError, ValueError, struct.error) as e:
        raise ConfigError(f"{path}: not a readable safetensors file ({e}); check the file") from None
    out = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        numel = math.prod(info["shape"])
        start, end = info["data_offsets"]
        out.append(TensorInfo(name, numel, end - start))
    return out


def folder_params(folder: Path) -> int | None:
    """Parameter count of a diffusers/transformers component folder from its safetensors headers."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    return sum(t.numel for f in files for t in read_header(f))


def file_params(path: Path) -> int:
    return sum(t.numel for t in read_header(path))


def meta_transformer(family: str, config: dict[str, Any]) -> torch.nn.Module:
    """The transformer on the meta device: exact shapes, no memory."""
    from diffusers import FluxTransformer2DModel, HiDreamImageTransformer2DModel

    cls = {"flux": FluxTransformer2DModel, "hidream": HiDreamImageTransformer2DModel}[family]
    with torch.device("meta"):
        return cls.from_config(config)


@dataclass(frozen=True)
class TransformerSizes:
    params: int
    quantizable: int  # weights of the Linear layers a quantised base quantises
    quantizable_rows: int  # their output rows (one scale each for per-channel precisions)
    largest_block: int  # params of the largest repeated block (group offload keeps whole blocks)
    outside_blocks: int  # params not inside any repeated block
    largest_leaf: int  # params of the largest single module with its own weights (leaf_level)


def transformer_sizes(family: str, module: torch.nn.Module) -> TransformerSizes:
    from ..quantize import KEEP, quantizable_linears
    from .saved import block_modules

    names = quantizable_linears(module, KEEP.get(family, ()))
    linears = [module.get_submodule(n) for n in names]
    blocks = [sum(p.numel() for p in b.parameters()) for _, b in block_modules(module)]
    total = sum(p.numel() for p in module.parameters())
    leaves = [
        sum(p.numel() for p in m.parameters(recurse=False))
        for m in module.modules()
        if list(m.parameters(False))
    ]
    return TransformerSizes(
        params=total,
        quantizable=sum(m.weight.numel() for m in linears),
        quantizable_rows=sum(m.out_features for m in linears),
        largest_block=max(blocks, default=0),
        outside_blocks=total - sum(blocks),
        largest_leaf=max(leaves, default=0),
    )


def base_bytes(sizes: TransformerSizes, precision: str, dtype_bytes: int, params: int | None = None) -> int:
    """Device bytes of the frozen transformer at `precision` (no_change: all at dtype_bytes)."""
    total = params if params is not None else sizes.params
    if precision == "no_change":
        return total * dtype_bytes
    rest = total - sizes.quantizable
    scales = (
        sizes.quantizable_rows * dtype_bytes
        if precision in ("int8-quanto", "int8-torchao", "fp8-quanto")
        else 0
    )
    return int(rest * dtype_bytes + sizes.quantizable * QUANT_BYTES[precision] + scales)
