"""A checkpoint's manifest: size and sha256 of every file, kept in the `complete` marker.

The marker is written last, after every file is fsynced, so the manifest describes exactly what was
written. `verify` re-reads the files and names the first one that differs (a bit flip on disk, a
truncated copy, a file edited by hand). A marker that does not parse is "incomplete", never an error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..data.discovery import file_hash  # sha256 in 1 MiB chunks, as for dataset images

MARKER = "complete"


def build_manifest(root: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    return {name: {"size": (root / name).stat().st_size, "sha256": file_hash(root / name)} for name in names}


def read_marker(path: str | Path) -> dict[str, Any] | None:
    """The marker's content, or None when it is missing, torn, empty or not ours."""
    try:
        marker = json.loads((Path(path) / MARKER).read_bytes().decode("utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or not isinstance(marker.get("files"), list):
        return None
    step = marker.get("step")
    if isinstance(step, bool) or not isinstance(step, int):
        return None
    return marker


def verify(path: str | Path) -> str | None:
    """None when the checkpoint is whole, else why not (names the file). Checkpoints written before
    manifests existed are checked for their files' presence only."""
    root = Path(path)
    marker = read_marker(root)
    if marker is None:
        return f"its '{MARKER}' marker is missing or damaged (the write was interrupted)"
    manifest = marker.get("manifest")
    names = list(manifest) if isinstance(manifest, dict) else marker["files"]
    for name in names:
        file = root / str(name)
        if not file.is_file():
            return f"{name} is missing"
        if not isinstance(manifest, dict):
            continue
        want = manifest[name] if isinstance(manifest[name], dict) else {}
        size = file.stat().st_size
        if size != want.get("size"):
            return f"{name} has {size} bytes, the manifest says {want.get('size')} (truncated or replaced)"
        if file_hash(file) != want.get("sha256"):
            return f"{name} does not match its sha256 in the manifest (the file is corrupt)"
    return None
