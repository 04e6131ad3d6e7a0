"""One reader for ComfyUI-format `.safetensors` files: header first, prefix views, scaled fp8 folded.

A ComfyUI file is a flat safetensors state dict. A diffusion-model file has bare (BFL / diffusers)
names or `model.diffusion_model.` ones; an all-in-one checkpoint also holds `text_encoders.*` (Flux,
HiDream, SD3; `cond_stage_model.*` in SD1/SDXL-style files) and `vae.*` (`first_stage_model.*`),
as comfy/supported_models*.py lay them out. `view(prefix)` reads one part with the prefix stripped.

Scaled fp8 (comfy/ops.py `scaled_fp8_ops`, comfy/model_detection.py): a `scaled_fp8` marker tensor
and per-layer `<layer>.scale_weight` (and optional `.scale_input`) beside float8 weights; the real
weight is `weight.float() * scale_weight`. `tensor()` folds that in; the bookkeeping names never show
in `names`. Newer per-layer quantisation layouts (`_quantization_metadata`, `.comfy_quant`, nvfp4's
`weight_scale_2` ...) are refused with a clear error rather than loaded wrong.

`load_module` fills a module built on the meta device block by block with `assign=True`; tensors are
read with `readinto` into fresh memory (no file pages stay mapped), so host RAM peaks at ~1.0x the
loaded weights (benchmarks/single_file_memory.py).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError

# Prefixes of the parts of a ComfyUI all-in-one checkpoint (comfy/supported_models*.py).
DIFFUSION_PREFIXES = ("model.diffusion_model.",)
TEXT_ENCODER_PREFIXES = ("text_encoders.", "cond_stage_model.", "conditioner.embedders.")
VAE_PREFIXES = ("vae.", "first_stage_model.")
KNOWN_PREFIXES = DIFFUSION_PREFIXES + TEXT_ENCODER_PREFIXES + VAE_PREFIXES

# Scaled-fp8 bookkeeping: never model weights.
_MARKER = "scaled_fp8"
_SCALE_SUFFIXES = (".scale_weight", ".scale_input")
# Newer ComfyUI per-layer quantisation (mixed precision, nvfp4, ...): not loadable as plain weights.
_NEWER_QUANT_SUFFIXES = (".comfy_quant", ".weight_scale", ".weight_scale_2", ".input_scale")
_NEWER_QUANT_METADATA = ("_quantization_metadata",)
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def _is_bookkeeping(name: str) -> bool:
    return name == _MARKER or name.endswith("." + _MARKER) or name.endswith(_SCALE_SUFFIXES)


class WeightsFile:
    """A safetensors file, header read at open, tensors on demand (or a prefix view of one). `origin` and `key` name the config
    and key the file came from, for error messages."""

    def __init__(self, handle: Any, path: Path, origin: str, key: str, prefix: str = ""):
        self._handle = handle
        self.path = path
        self.origin = origin
        self.key = key
        self.prefix = prefix
        self._all = [n for n in handle.keys() if n.startswith(prefix)]
        self._all_set = set(self._all)
        self.names = [n[len(prefix) :] for n in self._all if not _is_bookkeeping(n[len(prefix) :])]
        self._names_set = set(self.names)

    # -- opening -----------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: Path | str, origin: str, key: str) -> WeightsFile:
        path = Path(path)
        where = f"{origin}: key '{key}'"
        if not path.is_file():
            raise ConfigError(
                f"{where}: file {path} not found; set '{key}' to an existing .safetensors file."
            )
        if path.suffix.lower() != ".safetensors":
            raise ConfigError(
                f"{where}: {path.name} is not a .safetensors file; TuneGraph reads only safetensors "
                "(pickled .ckpt/.pt/.bin files can run code when loaded): use the .safetensors release."
            )
        try:
            handle = _Store(path)
            metadata = handle.metadata()
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(
                f"{where}: {path} is not a readable safetensors file ({exc}); it may be truncated or "
                "corrupt (an interrupted download or copy): download or copy it again."
            ) from None
        wf = cls(handle, path, origin, key)
        wf._refuse_newer_quant(metadata)
        return wf

    def _refuse_newer_quant(self, metadata: Mapping[str, str]) -> None:
        newer = [k for k in _NEWER_QUANT_METADATA if k in metadata]
        newer += [n for n in self._all if n.endswith(_NEWER_QUANT_SUFFIXES)][:3]
        newer += [n for n in self._all if self._handle.dtype_name(n) not in _DTYPES][:3]
        if newer:
            raise ConfigError(
                f"{self.where}: {self.path.name} uses a newer ComfyUI per-layer quantisation layout "
                f"({', '.join(newer[:3])}) that TuneGraph cannot train on; use the bf16/fp16, fp8 "
                "(float8_e4m3fn) or scaled-fp8 release of this model."
            )

    # -- what is inside ----------------------------------------------------------------------------

    @property
    def where(self) -> str:
        return f"{self.origin}: key '{self.key}'"

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self._handle.metadata())

    @property
    def is_scaled_fp8(self) -> bool:
        """ComfyUI's scaled fp8: the `scaled_fp8` marker or any `<layer>.scale_weight` in this view."""
        return any(_is_bookkeeping(n[len(self.prefix) :]) for n in self._all)

    def __contains__(self, name: str) -> bool:
        return name in self._names_set

    def __len__(self) -> int:
        return len(self.names)

    def _full(self, name: str) -> str:
        full = self.prefix + name
        if name not in self._names_set:
            raise ConfigError(f"{self.where}: {self.path.name} has no tensor '{full}'")
        return full

    def shape(self, name: str) -> tuple[int, ...]:
        return self._handle.shape(self._full(name))

    def dtype(self, name: str) -> torch.dtype:
        """The stored dtype (float8 for fp8 and scaled-fp8 weights)."""
        return _DTYPES[self._handle.dtype_name(self._full(name))]

    def scale(self, name: str) -> torch.Tensor | None:
        """The scaled-fp8 `scale_weight` of weight `name` (a `.weight` tensor), or None."""
        if not name.endswith(".weight"):
            return None
        full = self.prefix + name[: -len("weight")] + "scale_weight"
        return self._handle.read(full).float() if full in self._all_set else None

    def raw(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The tensor as stored (fp8 stays fp8, no scale applied); `rows` reads only rows [a, b)."""
        return self._handle.read(self._full(name), rows)

    def tensor(
        self, name: str, dtype: torch.dtype | None = None, rows: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """Tensor `name` (or its rows [a, b)) with its scaled-fp8 scale folded in, cast to `dtype`
        (None: stored dtype, float32 for a folded scaled-fp8 weight)."""
        t = self.raw(name, rows)
        scale = self.scale(name)
        if scale is not None:
            t = t.float() * scale
        return t if dtype is None or t.dtype == dtype else t.to(dtype)

    # -- views -------------------------------------------------------------------------------------

    def view(self, prefix: str) -> WeightsFile:
        """The tensors under `prefix`, named without it (scaled-fp8 bookkeeping stays reachable)."""
        return WeightsFile(self._handle, self.path, self.origin, self.key, self.prefix + prefix)

    def prefixes(self) -> dict[str, int]:
        """Known ComfyUI part prefixes present in this view, with how many tensors each holds."""
        return prefix_counts(self.names)

    def part(self, role: str) -> WeightsFile | None:
        """The view of one part of an all-in-one checkpoint: role "diffusion_model", "text_encoders"
        or "vae"; None when the file has no such prefix."""
        options = {
            "diffusion_model": DIFFUSION_PREFIXES,
            "text_encoders": TEXT_ENCODER_PREFIXES,
            "vae": VAE_PREFIXES,
        }
        counts = self.prefixes()
        for prefix in options[role]:
            if counts.get(prefix):
                return self.view(prefix)
        return None

    def model_view(self) -> WeightsFile:
        """The diffusion model: `model.diffusion_model.*` when present, else the bare names."""
        return self.part("diffusion_model") or self


_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class _Store:
    """The safetensors layout read directly: an 8-byte header length, a JSON header (dtype, shape,
    byte offsets per tensor, `__metadata__`), then the data. Each tensor is read with `readinto`
    into its own fresh tensor, so no file page stays mapped into the process: loading peaks at the
    loaded weights, where reading through a memory map counts the mapped pages as well (~1.5x)."""

    def __init__(self, path: Path):
        self.size = path.stat().st_size
        self.file = open(path, "rb", buffering=0)  # noqa: SIM115 (lives as long as the views)
        length = int.from_bytes(self.file.read(8), "little")
        if length <= 0 or 8 + length > self.size:
            raise ValueError(f"header length {length} does not fit a file of {self.size} bytes")
        header = json.loads(self.file.read(length))
        self._metadata = header.pop("__metadata__", None) or {}
        self.base = 8 + length
        self.header = header
        for name, info in header.items():
            start, end = info["data_offsets"]
            if not 0 <= start <= end or self.base + end > self.size:
                raise ValueError(f"tensor '{name}' lies past the end of the file ({self.size} bytes)")

    def keys(self) -> list[str]:
        return list(self.header)

    def metadata(self) -> dict[str, str]:
        return self._metadata

    def dtype_name(self, name: str) -> str:
        return self.header[name]["dtype"]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Tensor `name`, or only its rows [first, last) (a contiguous byte range: no full read)."""
        info = self.header[name]
        start, end = info["data_offsets"]
        shape = list(info["shape"])
        if rows is not None:
            row_bytes = (end - start) // shape[0]
            start, shape[0] = start + rows[0] * row_bytes, rows[1] - rows[0]
            end = start + shape[0] * row_bytes
        t = torch.empty(shape, dtype=_DTYPES[info["dtype"]])
        view = t.reshape(-1).view(torch.uint8).numpy()
        if view.nbytes != end - start:
            raise ValueError(f"tensor '{name}': {end - start} bytes for {view.nbytes} expected")
        self.file.seek(self.base + start)
        done = 0
        while done < view.nbytes:  # one read returns at most ~2 GB on Linux
            n = self.file.readinto(view[done:])
            if not n:
                raise ValueError(f"tensor '{name}': the file ends early")
            done += n
        return t


def prefix_counts(names: Iterable[str]) -> dict[str, int]:
    """How many names start with each known ComfyUI part prefix (only those present)."""
    counts: dict[str, int] = {}
    for name in names:
        for prefix in KNOWN_PREFIXES:
            if name.startswith(prefix):
                counts[prefix] = counts.get(prefix, 0) + 1
    return counts


# -- loading into a module built on the meta device --------------------------------------------------


@contextmanager
def empty_weights() -> Iterator[None]:
    """Build modules on the meta device: no memory and no random init (12B parameters take minutes
    to initialise on a CPU). `load_module` then assigns every tensor; a module whose computed buffers
    are not in its state dict would stay on meta, which `load_module` reports."""
    with torch.device("meta"):
        yield


_BLOCK = re.compile(r"^(.*?\.\d+)\.")


def _block_of(name: str) -> str:
    """`transformer_blocks.3.attn.to_q.weight` -> `transformer_blocks.3`; top-level names -> ''."""
    m = _BLOCK.match(name)
    return m.group(1) if m else ""


TensorSource = Mapping[str, Callable[[], torch.Tensor]] | Iterable[tuple[str, torch.Tensor]]


def load_module(
    module: torch.nn.Module,
    tensors: TensorSource,
    dtype: torch.dtype | None,
    where: str = "weights file",
) -> torch.nn.Module:
    """Fill `module` (built under `empty_weights()`) from `tensors` ({name: loader} or (name, tensor)
    pairs), one block at a time with `load_state_dict(assign=True)`; tensors are cast to `dtype`
    (None keeps theirs). Missing or unexpected names are a ConfigError naming `where` (the file)."""
    expected = set(module.state_dict().keys())
    if isinstance(tensors, Mapping):
        unexpected = sorted(set(tensors) - expected)
        if unexpected:
            raise _mismatch(where, "unexpected", unexpected, module)
        items: Iterable[tuple[str, Any]] = tensors.items()
    else:
        items = tensors
    loaded: set[str] = set()
    block, pending = None, {}
    for name, value in items:
        if name not in expected:
            raise _mismatch(where, "unexpected", [name], module)
        if _block_of(name) != block and pending:
            module.load_state_dict(pending, strict=False, assign=True)
            pending = {}
        block = _block_of(name)
        t = value() if callable(value) else value
        pending[name] = t if dtype is None or not t.is_floating_point() or t.dtype == dtype else t.to(dtype)
        loaded.add(name)
    if pending:
        module.load_state_dict(pending, strict=False, assign=True)
    missing = sorted(expected - loaded)
    if missing:
        raise _mismatch(where, "missing", missing, module)
    left = [n for n, b in module.named_buffers() if b.is_meta]
    if left:
        raise ConfigError(
            f"{where}: {type(module).__name__} has computed buffers ({left[:3]}) a meta build cannot fill"
        )
    return module


def _mismatch(where: str, what: str, names: list[str], module: torch.nn.Module) -> ConfigError:
    return ConfigError(
        f"{where}: the weights do not fit {type(module).__name__}: {len(names)} {what} tensor(s), e.g. "
        f"{', '.join(names[:4])}. Check that the file is this model family's diffusion model (or VAE), "
        "not a LoRA, another model, or a different variant."
    )
