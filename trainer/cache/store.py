"""Content-addressed safetensors files: a key names what went into a tensor, a write is all-or-nothing.

An entry lives at `<cache_dir>/<key>.safetensors`. The key hashes every input that affects the
tensor, so changing an input changes the key and stale entries are never read (they stay on disk until
the folder is cleared). What an entry holds is checked on read (`entry_problem`): a sha256 of its
tensors recorded at write time, finite values, and the shapes the caller expects; a file damaged or
replaced on disk is then recomputed instead of trained on.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import TrainingError, TuneGraphError

log = logging.getLogger("tunegraph")

FORMAT_VERSION = 2  # bump to invalidate every entry when the stored layout changes


def content_key(kind: str, **parts: Any) -> str:
    """sha256 over the kind, the format version and every named part (stable JSON)."""
    blob = json.dumps({"kind": kind, "v": FORMAT_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def entry_path(cache_dir: Path, key: str) -> Path:
    return Path(cache_dir) / f"{key}.safetensors"


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` on a temp file beside `path`, then rename it into place. If `write` raises,
    the temp file is removed and `path` is untouched, so readers never see a partial entry."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem[:16]}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


DIGEST_KEY = "tunegraph_sha256"


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes (in name order)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_tensors(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    # Own each tensor: a row of a batch shares storage with the batch, which safetensors refuses.
    owned = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    meta = {**(metadata or {}), DIGEST_KEY: tensors_digest(owned)}
    try:
        atomic_write(path, lambda tmp: save_file(owned, str(tmp), metadata=meta))
    except Exception as exc:
        if is_disk_full(exc):
            size = sum(t.numel() * t.element_size() for t in owned.values())
            raise DiskFullError(Path(path).parent, size) from None
        raise


class DiskFullError(TuneGraphError):
    """The cache folder's disk is full; `entry_bytes` is the size of the entry that did not fit."""

    def __init__(self, folder: Path, entry_bytes: int, remaining: int = 1):
        self.folder, self.entry_bytes, self.remaining = folder, entry_bytes, remaining
        need = entry_bytes * remaining
        super().__init__(
            f"the disk of cache folder {folder} is full: about {need / 2**20:.1f} MiB more are needed for "
            f"{remaining} entr{'y' if remaining == 1 else 'ies'} still to write ({_free_text(folder)}); "
            "free space there (or point the cache elsewhere) and run again: entries already written are kept"
        )


def _free_text(folder: Path) -> str:
    try:
        return f"{shutil.disk_usage(folder).free / 2**20:.1f} MiB free now"
    except OSError:
        return "free space unknown"


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC from Python, or safetensors' own error carrying it (os error 28 / StorageFull)."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return True
    text = str(exc)
    return "StorageFull" in text or "os error 28" in text or "No space left" in text


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """An entry's tensors, checked against the hash recorded at write time (training never reads a
    file damaged after the cache was built)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            digest = (f.metadata() or {}).get(DIGEST_KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise TrainingError(
            f"cache entry {path} cannot be read ({str(exc)[:80]}); run again to recompute it"
        ) from None
    if digest is not None and tensors_digest(tensors) != digest:
        raise TrainingError(
            f"cache entry {path} changed on disk since it was written; run again: it will be recomputed"
        )
    return tensors


def entry_problem(path: Path, shapes: dict[str, tuple[int, ...]] | None = None) -> str | None:
    """Why a cache entry must not be used (None when it is good): unreadable, not written by us (no
    content hash), changed since it was written, NaN/Inf, or another shape than `shapes` expects."""
    try:
        with safe_open(str(path), framework="pt") as f:
            digest = (f.metadata() or {}).get(DIGEST_KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        return f"unreadable ({str(exc)[:80]})"
    if not tensors:
        return "empty"
    if digest is None:
        return "no content hash (not written by TuneGraph's cache)"
    if tensors_digest(tensors) != digest:
        return "its tensors do not match the hash recorded when it was written (corrupt on disk)"
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return f"'{name}' holds NaN or Inf"
    for name, shape in (shapes or {}).items():
        if name not in tensors:
            return f"has no '{name}' tensor"
        if tuple(tensors[name].shape) != tuple(shape):
            return f"'{name}' has shape {tuple(tensors[name].shape)}, expected {tuple(shape)}"
    return None


def usable(path: Path, shapes: dict[str, tuple[int, ...]] | None = None) -> bool:
    """True for a good entry; False when missing, or when damaged (then one warning names it)."""
    if not Path(path).exists():
        return False
    problem = entry_problem(path, shapes)
    if problem is not None:
        log.warning("cache entry %s is bad (%s); recomputing it", path, problem)
    return problem is None


def is_valid(path: Path) -> bool:
    """The entry exists and its safetensors header reads (guards against files damaged outside us)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return len(list(f.keys())) > 0
    except Exception:
        return False
