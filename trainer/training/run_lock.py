"""One training run per output folder, for the run's whole life.

A run takes `output_dir/.tunegraph-run.lock` before it reads or writes anything there: an exclusive
`flock` on a file descriptor it keeps open, and the holder's pid, host and start time written into
the file (for the message a second run gets). The kernel drops a flock when its process dies, however
it dies (exit, Cancel, SIGTERM, SIGKILL), so a lock left by a killed run is simply free: the next run
takes it over and says whose it was. A second run on a held folder stops at once with a
`RunLocked` error naming the folder, the holder and what to do.

Sharing: the process holding the lock may take it again (the TrainLoKr node holds it, then calls
`train()`, which takes it too); under torchrun only rank 0 takes it; training processes that a holder
starts itself (the node's `processes > 1`) get `TUNEGRAPH_RUN_LOCK` naming the holder and share its
lock instead of waiting for it.

Where `fcntl` is missing (Windows) or the filesystem refuses flock, the lock file is created with
O_CREAT|O_EXCL instead and a holder on this host that is no longer running is taken over.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import TrainingError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

log = logging.getLogger("tunegraph")

LOCK_NAME = ".tunegraph-run.lock"
ENV = "TUNEGRAPH_RUN_LOCK"  # "<pid>:<folder>": this process's launcher holds that folder's lock

_held: dict[str, list] = {}  # resolved folder -> [fd or None, owning thread id, depth]
_guard = threading.Lock()


class RunLocked(TrainingError):
    """Another run holds the output folder."""


@dataclass(frozen=True)
class Holder:
    pid: int
    host: str
    started: str
    what: str = "a training run"

    def describe(self) -> str:
        return f"{self.what}, pid {self.pid} on host {self.host}, started {self.started}"


def lock_path(output_dir: str | Path) -> Path:
    return Path(output_dir) / LOCK_NAME


def read_holder(output_dir: str | Path) -> Holder | None:
    """Who the lock file names (the live holder, or the last one if nobody holds it now)."""
    try:
        data = json.loads(lock_path(output_dir).read_text(encoding="utf-8"))
        return Holder(int(data["pid"]), str(data["host"]), str(data["started"]), str(data.get("what", "")))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _this_holder(what: str) -> Holder:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    return Holder(os.getpid(), socket.gethostname(), now, what)


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs on this host (checkpoint.py's scratch cleanup asks the same)."""
    try:
        import psutil

        return psutil.pid_exists(pid)
    except ImportError:
        pass
    if os.name == "nt":
        return True  # cannot tell without psutil: assume the holder still runs
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _locked_message(folder: Path, holder: Holder | None, choose: str) -> str:
    unnamed = f"its lock file {lock_path(folder)} names no holder; delete it if no run uses this folder"
    who = holder.describe() if holder else unnamed
    return (
        f"output folder {folder} is in use by another training run ({who}); two runs never share a "
        f"folder: wait for that run to finish or stop it, or choose another {choose}"
    )


def _write_holder(fd: int, holder: Holder) -> None:
    body = json.dumps(
        {"pid": holder.pid, "host": holder.host, "started": holder.started, "what": holder.what}
    )
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, body.encode())
    os.fsync(fd)


def _flock(folder: Path) -> int | None:
    """An fd holding the flock on the current lock file, None when another process holds it.
    Raises OSError when flock is not supported here."""
    path = lock_path(folder)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except OSError:
            os.close(fd)
            raise
        try:  # a releasing holder unlinks the file: make sure we locked the one at the path now
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def _exclusive_create(folder: Path, holder: Holder) -> int | None:
    """The fallback without flock: create the file exclusively; take over a dead holder on this host."""
    path = lock_path(folder)
    for _ in range(2):
        try:
            return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            old = read_holder(folder)
            if old is None or old.host != holder.host:
                return None
            if old.pid != holder.pid and pid_alive(old.pid):  # our own pid: a leftover, not held
                return None
            path.unlink(missing_ok=True)
    return None


def _acquire(folder: Path, holder: Holder, choose: str) -> int | None:
    previous = read_holder(folder)
    try:
        fd = _flock(folder) if fcntl is not None else _exclusive_create(folder, holder)
    except OSError:  # a filesystem without flock
        fd = _exclusive_create(folder, holder)
    if fd is None:
        current = _wait_for_holder(folder)
        if _shared_with_launcher(folder, current):
            return None
        raise RunLocked(_locked_message(folder, current, choose))
    if previous is not None and previous.pid != holder.pid:
        log.warning(
            "output folder %s: taking over the lock of a run that is no longer running (%s)",
            folder,
            previous.describe(),
        )
    _write_holder(fd, holder)
    return fd


def _wait_for_holder(folder: Path, seconds: float = 1.0) -> Holder | None:
    """The holder's name, allowing a run that has just taken the lock a moment to write it."""
    deadline = time.monotonic() + seconds
    while (holder := read_holder(folder)) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    return holder


def _shared_with_launcher(folder: Path, current: Holder | None) -> bool:
    """True in a training process whose launcher (named by TUNEGRAPH_RUN_LOCK) holds this folder."""
    pid, _, path = os.environ.get(ENV, "").partition(":")
    if not pid.isdigit() or current is None or current.pid != int(pid):
        return False
    return Path(path).resolve() == folder.resolve()


def _release(folder: Path, fd: int | None) -> None:
    if fd is None:  # shared with the launcher: it releases
        return
    if os.name == "nt":  # an open file cannot be deleted there (and there is no flock to keep)
        os.close(fd)
    with contextlib.suppress(OSError):
        lock_path(folder).unlink()  # while still locked, so nobody takes a file about to vanish
    if os.name != "nt":
        os.close(fd)


def _is_rank_above_zero() -> bool:
    try:
        return int(os.environ.get("RANK", "0") or 0) > 0
    except ValueError:
        return False


@contextlib.contextmanager
def hold_output_dir(
    output_dir: str | Path, what: str = "tunegraph train", choose: str = "output_dir"
) -> Iterator[None]:
    """Hold the folder's run lock for the `with` block (see the module doc). `what` names this run
    in a second run's message; `choose` is the setting that message tells the user to change."""
    if _is_rank_above_zero():  # torchrun: rank 0 holds it for the job
        yield
        return
    folder = Path(output_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TrainingError(
            f"output_dir {folder} cannot be written ({e.strerror}); choose another folder"
        ) from None
    key = str(folder.resolve())
    me = threading.get_ident()
    with _guard:
        entry = _held.get(key)
        if entry is not None and entry[1] != me:
            raise RunLocked(_locked_message(folder, read_holder(folder), choose))
        if entry is None:
            entry = _held[key] = [_acquire(folder, _this_holder(what), choose), me, 0]
        entry[2] += 1
    try:
        yield
    finally:
        with _guard:
            entry[2] -= 1
            if entry[2] == 0:
                del _held[key]
                _release(folder, entry[0])


def launcher_env(output_dir: str | Path) -> dict[str, str]:
    """Environment for processes this process starts to train in `output_dir` under its lock."""
    key = str(Path(output_dir).resolve())
    return {ENV: f"{os.getpid()}:{key}"} if key in _held else {}
