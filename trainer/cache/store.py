"""Content-addressed safetensors files: a key names what went into a tensor, a write is all-or-nothing.

An entry lives at `<cache_dir>/<key>.safetensors`. Because the key hashes every input that affects the
tensor, an entry that exists is valid; changing an input changes the key, so stale entries are never
read (they stay on disk until the folder is cleared).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

FORMAT_VERSION = 1  # bump to invalidate every entry when the stored layout changes


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


def save_tensors(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    # Own each tensor: a row of a batch shares storage with the batch, which safetensors refuses.
    owned = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(owned, str(tmp), metadata=metadata))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def is_valid(path: Path) -> bool:
    """The entry exists and its safetensors header reads (guards against files damaged outside us)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return len(list(f.keys())) > 0
    except Exception:
        return False
