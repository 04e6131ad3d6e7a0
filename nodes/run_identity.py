"""Which TrainLoKr run a run folder belongs to (`<run>/tunegraph_run.json`), and handing it to another.

The same inputs again resume (or reuse) the folder's run. Changed inputs move the old run's results
(checkpoints, final adapter, EMA, metrics, loss plot, validation images, its config and identity
file) into a new folder of its own, `superseded/<old identity>-<UTC time>[-N]/`, created exclusively,
so a superseded run is never overwritten or deleted, however often the folder changes hands.

A folder with training results but no readable identity file was not written by a TrainLoKr run (a
`tunegraph train` run, or files copied in): it is foreign, left exactly as it is, and the node stops
with an error saying what to do. The identity file is written atomically (temp file, fsync, rename).
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

from ..trainer.errors import TrainingError
from ..trainer.training.run import FINAL_NAME

RUN_FILE = "tunegraph_run.json"
RESULTS = (FINAL_NAME, "ema", "metrics.jsonl", "loss.png", "validation")  # beside the checkpoints
MOVED_ALONG = ("config", "logs", RUN_FILE)  # go with a superseded run, but alone are no results


def previous_identity(run_dir: Path) -> str | None:
    try:
        identity = json.loads((run_dir / RUN_FILE).read_text(encoding="utf-8"))["identity"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return identity if isinstance(identity, str) and identity else None


def write_identity(run_dir: Path, identity: str) -> None:
    """Write the identity file atomically: a reader sees the old file or the whole new one."""
    tmp = run_dir / f".{RUN_FILE}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps({"identity": identity}))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, run_dir / RUN_FILE)
    finally:
        tmp.unlink(missing_ok=True)


def results(run_dir: Path) -> list[Path]:
    """A run's outputs in `run_dir`: checkpoint folders (complete or not) and the RESULTS present."""
    ckpts = sorted(p for p in run_dir.glob("checkpoint-*") if p.is_dir())
    return ckpts + [run_dir / n for n in RESULTS if (run_dir / n).exists()]


def _foreign_message(run_dir: Path, found: list[Path]) -> str:
    names = ", ".join(p.name for p in found[:4]) + (", ..." if len(found) > 4 else "")
    return (
        f"TrainLoKr: output folder {run_dir} holds training results ({names}) that no TrainLoKr run "
        f"recorded ({RUN_FILE} is missing or unreadable; e.g. a `tunegraph train` run wrote them). They are "
        "left as they are: choose another output_name, or move those files out of the folder to train here"
    )


def supersede(run_dir: Path, old_identity: str) -> Path:
    """Move the old run's results and files into a new folder of their own under superseded/."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    root = run_dir / "superseded"
    root.mkdir(exist_ok=True)
    n = 1
    while True:  # mkdir without exist_ok claims the name; a taken one is never reused
        dest = root / (f"{old_identity}-{stamp}" + (f"-{n}" if n > 1 else ""))
        try:
            dest.mkdir()
            break
        except FileExistsError:
            n += 1
    for p in results(run_dir) + [run_dir / n for n in MOVED_ALONG if (run_dir / n).exists()]:
        os.replace(p, dest / p.name)
    return dest


def claim_run_dir(run_dir: Path, identity: str) -> str:
    """Make `run_dir` belong to `identity`: "resume" when it already does (Cancel then re-queue
    continues from the latest checkpoint), else "fresh", after moving a previous run's results into
    superseded/ (see the module doc). A foreign folder is a TrainingError; nothing is moved."""
    run_dir.mkdir(parents=True, exist_ok=True)
    old = previous_identity(run_dir)
    if old == identity:
        return "resume"
    found = results(run_dir)
    if found and old is None:
        raise TrainingError(_foreign_message(run_dir, found))
    if found:
        supersede(run_dir, old)
    write_identity(run_dir, identity)
    return "fresh"
