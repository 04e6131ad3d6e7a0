"""Atomic checkpoints in `output_dir/checkpoint-N/`, SimpleTuner's layout.

A checkpoint is written into `output_dir/.checkpoint-N.tmp-<pid>/`, every file fsynced, a
`complete` marker written last inside it, and only then renamed to `checkpoint-N`. A run killed at
any moment therefore leaves either the old state or a whole new checkpoint. The marker carries a
manifest (size + sha256 per file, ckpt_manifest.py): resuming verifies it, and `latest` skips a
damaged checkpoint (named in a warning) for the newest one that verifies.
"""

from __future__ import annotations

import contextlib
import errno
import json as jsonlib
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..errors import TrainingError
from .ckpt_manifest import MARKER, build_manifest, read_marker, verify
from .run_lock import pid_alive

log = logging.getLogger("tunegraph")
_NAME = re.compile(r"^checkpoint-(\d+)$")
_SCRATCH = re.compile(r"^\.checkpoint-(\d+)\.(tmp|old)-(\d+)$")


@dataclass
class Checkpoint:
    """What `load_checkpoint` read back: tensors from *.safetensors, objects from *.pt, json from *.json."""

    path: Path
    step: int
    tensors: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    objects: dict[str, Any] = field(default_factory=dict)
    json: dict[str, Any] = field(default_factory=dict)

    def file(self, name: str) -> Path:
        return self.path / name


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / f"checkpoint-{int(step)}"


def is_complete(path: str | Path) -> bool:
    """The marker is there and parses (a torn or empty marker means the write never finished)."""
    return read_marker(path) is not None


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints as (step, path), oldest first; temp dirs and unmarked dirs are skipped."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _NAME.match(child.name)
        if match and child.is_dir() and is_complete(child):
            found.append((int(match.group(1)), child))
    return sorted(found)


def find_latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest checkpoint that verifies against its manifest; each newer one that does not is
    named in a warning and skipped."""
    for _, path in reversed(list_checkpoints(output_dir)):
        problem = verify(path)
        if problem is None:
            return path
        log.warning("checkpoint %s is damaged (%s); skipped, trying an older one", path, problem)
    return None


def _restore_orphans(root: Path) -> None:
    """Put back a complete `.checkpoint-N.old-PID` whose checkpoint-N vanished (a writer killed between
    the two renames of an overwrite). At resume time this process writes nothing, so its own pid's
    leftovers count as orphans too."""
    clean_stale(root)
    for child in root.iterdir() if root.is_dir() else ():
        match = _SCRATCH.match(child.name)
        final = checkpoint_dir(root, int(match.group(1))) if match else None
        if match and match.group(2) == "old" and int(match.group(3)) == os.getpid() and is_complete(child):
            _put_back(child, final)


def _put_back(old: Path, final: Path) -> None:
    """Rename a moved-aside checkpoint back; another rank doing the same first is fine."""
    if not final.exists():
        with contextlib.suppress(OSError):
            os.replace(old, final)


def _latest_or_stop(root: Path) -> Path | None:
    """`latest`: the newest verified checkpoint; None only when there was never one. Checkpoints that
    exist but all fail verification stop the run instead of silently restarting at step 0."""
    _restore_orphans(root)
    found = find_latest_checkpoint(root)
    if found is not None:
        return found
    damaged = [(p, verify(p)) for _, p in list_checkpoints(root)]
    damaged += [(p, "no complete marker") for p in root.glob("checkpoint-*") if _NAME.match(p.name)
                and (p / MARKER).exists() and not is_complete(p)]  # fmt: skip
    if not damaged:
        return None
    listed = "; ".join(f"{p.name}: {why}" for p, why in damaged)
    raise TrainingError(
        f"resume_from_checkpoint 'latest': {root} has checkpoints but none verifies ({listed}). Not "
        "restarting from step 0: move them away to start over, or name a good checkpoint"
    )


def resolve_resume(output_dir: str | Path, resume_from_checkpoint: str | Path | None) -> Path | None:
    """None/"none" -> None; "latest" -> the newest complete checkpoint or None (a fresh start);
    a path (absolute, relative to the cwd, or a name inside output_dir) -> it, if complete."""
    if resume_from_checkpoint is None or str(resume_from_checkpoint).strip().lower() in ("", "none", "false"):
        return None
    value = str(resume_from_checkpoint).strip()
    if value.lower() == "latest":
        return _latest_or_stop(Path(output_dir))
    given = Path(value).expanduser()
    candidates = [given] if given.is_absolute() else [given, Path(output_dir) / given]
    for path in candidates:
        if path.is_dir():
            if not is_complete(path):
                raise TrainingError(
                    f"resume_from_checkpoint '{value}': {path} is not a complete checkpoint (no '{MARKER}' "
                    "marker: it was interrupted while being written); choose another one or 'latest'"
                )
            problem = verify(path)
            if problem is not None:
                raise TrainingError(
                    f"resume_from_checkpoint '{value}': {path} is damaged ({problem}); choose another one or 'latest'"
                )
            return path
    tried = " and ".join(str(p) for p in candidates)
    raise TrainingError(
        f"resume_from_checkpoint '{value}' not found (tried {tried}); give a checkpoint-N folder or 'latest'"
    )


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    # Directory fsync makes the rename durable; not every platform allows opening a directory.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    """Delete a checkpoint dir marker-first, so a kill mid-delete never leaves a 'complete' part."""
    (path / MARKER).unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)


def clean_stale(output_dir: str | Path) -> None:
    """Remove scratch dirs of dead writers. A complete `.old` dir whose checkpoint-N vanished (killed
    between the two renames of an overwrite) is put back instead."""
    root = Path(output_dir)
    if not root.is_dir():
        return
    for child in root.iterdir():
        match = _SCRATCH.match(child.name)
        if not match or pid_alive(int(match.group(3))):
            continue
        final = checkpoint_dir(root, int(match.group(1)))
        if match.group(2) == "old" and is_complete(child) and not final.exists():
            _put_back(child, final)
        else:
            _remove(child)


def _write_payload(tmp: Path, tensors, objects, json, files) -> list[str]:
    for name, state_dict in (tensors or {}).items():
        clean = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
        save_file(clean, str(tmp / name))
    for name, obj in (objects or {}).items():
        torch.save(obj, tmp / name)
    for name, obj in (json or {}).items():
        (tmp / name).write_text(jsonlib.dumps(obj, indent=2, sort_keys=True, default=str), encoding="utf-8")
    for name, writer in (files or {}).items():
        writer(tmp / name)
    written = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
    for rel in written:
        _fsync_file(tmp / rel)
    return written


def _write_marker(tmp: Path, step: int, written: list[str]) -> None:
    manifest = build_manifest(tmp, written)
    marker = {"step": int(step), "files": written, "manifest": manifest, "time": time.time()}
    with open(tmp / MARKER, "w", encoding="utf-8") as f:
        f.write(jsonlib.dumps(marker, indent=2))
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)


def _publish(tmp: Path, final: Path) -> None:
    """Rename tmp -> final; an existing final is moved aside first and deleted after."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        if old is not None and not final.exists():
            os.replace(old, final)  # never leave the step without its old checkpoint
        raise
    _fsync_dir(final.parent)
    if old is not None:
        _remove(old)


def _failure_message(final: Path, exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        why = "the disk is full; free space in the output_dir's disk"
    else:
        why = f"{type(exc).__name__}: {exc}"
    return f"could not write checkpoint {final} ({why}); the previous checkpoints are kept"


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    *,
    tensors: dict[str, dict[str, torch.Tensor]] | None = None,
    objects: dict[str, Any] | None = None,
    json: dict[str, Any] | None = None,
    files: dict[str, Callable[[Path], None]] | None = None,
    total_limit: int | None = None,
) -> Path:
    """Write `output_dir/checkpoint-<step>/` atomically and prune to `total_limit` (oldest first).

    tensors: file name -> state dict (safetensors); objects: file name -> anything torch.save takes
    (optimizer, scheduler, RNG state); json: file name -> JSON-able value; files: file name ->
    callable(path) that writes that file itself (e.g. the adapter's own save function).
    A failure removes the partial write and raises TrainingError; older checkpoints are untouched.
    """
    root = Path(output_dir)
    final = checkpoint_dir(root, step)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TrainingError(f"output_dir {root} cannot be created ({exc}); choose a writable folder") from exc
    clean_stale(root)
    tmp = root / f".checkpoint-{int(step)}.tmp-{os.getpid()}"
    try:
        if tmp.exists():
            _remove(tmp)
        tmp.mkdir()
        written = _write_payload(tmp, tensors, objects, json, files)
        _write_marker(tmp, step, written)
        _publish(tmp, final)
    except BaseException as exc:
        _remove(tmp)
        if isinstance(exc, Exception):
            raise TrainingError(_failure_message(final, exc)) from exc
        raise
    if total_limit is not None and total_limit > 0:
        prune_checkpoints(root, total_limit, keep=final)
    return final


def prune_checkpoints(output_dir: str | Path, total_limit: int, keep: Path | None = None) -> list[Path]:
    """Delete the oldest complete checkpoints until at most `total_limit` remain (never `keep`)."""
    found = [path for _, path in list_checkpoints(output_dir)]
    excess = len(found) - max(int(total_limit), 1)
    removed = []
    for path in found:
        if excess <= 0:
            break
        if keep is not None and path.resolve() == Path(keep).resolve():
            continue
        _remove(path)
        removed.append(path)
        excess -= 1
    return removed


def load_checkpoint(path: str | Path, *, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read a complete checkpoint dir: *.safetensors -> tensors, *.pt -> objects (weights_only),
    *.json -> json. Other files stay on disk for their owners (see `Checkpoint.file`)."""
    root = Path(path)
    marker = read_marker(root)
    if marker is None:
        raise TrainingError(f"{root} is not a complete checkpoint (no '{MARKER}' marker)")
    missing = [name for name in marker["files"] if not (root / name).is_file()]
    if missing:
        raise TrainingError(f"checkpoint {root} is missing {', '.join(missing)}; choose another checkpoint")
    problem = verify(root)
    if problem is not None:
        raise TrainingError(f"checkpoint {root} is damaged ({problem}); choose another checkpoint")
    ckpt = Checkpoint(path=root, step=int(marker["step"]))
    for name in marker["files"]:
        file = root / name
        try:
            if name.endswith(".safetensors"):
                ckpt.tensors[name] = load_file(str(file), device=str(map_location))
            elif name.endswith(".pt"):
                ckpt.objects[name] = torch.load(file, map_location=map_location, weights_only=True)
            elif name.endswith(".json"):
                ckpt.json[name] = jsonlib.loads(file.read_text(encoding="utf-8"))
        except Exception as exc:
            raise TrainingError(
                f"checkpoint file {file} cannot be read ({exc}); choose another checkpoint"
            ) from exc
    return ckpt
