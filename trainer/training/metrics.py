"""Training metrics: `output_dir/metrics.jsonl` (one JSON object per line), tensorboard, a progress bar.

metrics.jsonl is the record users and tools read. Each line is flushed as it is written; on resume,
lines past the resumed step are dropped so the file never shows steps twice. Non-finite numbers are
written as null (strict JSON).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import ConfigError, TrainingError

log = logging.getLogger("tunegraph")

METRICS_FILE = "metrics.jsonl"
TRACKERS = ("tensorboard", "wandb", "comet_ml")


def parse_report_to(report_to: str | list[str] | None) -> list[str]:
    """SimpleTuner's report_to: none | tensorboard | wandb | comet_ml | all, or a comma list."""
    if report_to is None:
        return []
    names = report_to if isinstance(report_to, list) else str(report_to).split(",")
    out: list[str] = []
    for raw in names:
        name = raw.strip().lower()
        if name in ("", "none"):
            continue
        if name == "all":
            out.extend(t for t in TRACKERS if t not in out)
        elif name not in TRACKERS:
            raise ConfigError(
                f"report_to: unknown tracker {raw!r}; use none, tensorboard, wandb, comet_ml or all"
            )
        elif name not in out:
            out.append(name)
    return out


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item") and callable(value.item):  # torch / numpy scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _record(raw: bytes) -> dict[str, Any] | None:
    """One line as a record, or None when it is torn, foreign, not UTF-8, not an object or has no
    whole-number step."""
    try:
        record = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(record, dict):
        return None
    step = record.get("step", 0)
    if isinstance(step, bool) or not isinstance(step, int):
        return None
    return record


def _lines(p: Path) -> list[bytes]:
    if p.exists() and not p.is_file():
        raise TrainingError(f"{p} is not a file (a folder is in its place); move it away and run again")
    try:
        return p.read_bytes().splitlines() if p.is_file() else []
    except OSError as e:
        raise TrainingError(f"{p} cannot be read ({e.strerror}); move it away and run again") from None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl. Lines that are not records (a torn last line of a killed run,
    foreign text, bytes that are not UTF-8) are skipped with one warning naming the file."""
    p = Path(path)
    records, bad = [], 0
    for raw in _lines(p):
        if not raw.strip():
            continue
        record = _record(raw)
        if record is None:
            bad += 1
        else:
            records.append(record)
    if bad:
        log.warning("%s: %d line(s) are not metric records; skipped", p, bad)
    return records


def truncate_metrics(path: str | Path, last_step: int) -> int:
    """Keep only good records with step <= last_step (rewritten atomically, so damaged lines go too);
    returns how many were kept."""
    p = Path(path)
    if not p.exists():
        return 0
    kept = [r for r in read_metrics(p) if int(r.get("step", 0)) <= last_step]
    tmp = p.with_name(p.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, p)
    return len(kept)


class MetricsWriter:
    """Appends metric records to output_dir/metrics.jsonl and mirrors scalars to tensorboard.

    `resume_step` is the step training continues from (0 for a fresh run, which also clears a
    previous run's lines). `enabled=False` (ranks other than 0) writes nothing."""

    def __init__(
        self,
        output_dir: str | Path,
        report_to: str | list[str] | None = "none",
        run_name: str = "tunegraph",
        *,
        resume_step: int = 0,
        enabled: bool = True,
        logging_dir: str | Path | None = None,
        project: str | None = None,
    ):
        self.output_dir = Path(output_dir)
        # tensorboard: <logging_dir (relative: under output_dir) or output_dir/logs>/[project/]run_name
        self.logs_root = self.output_dir / (logging_dir or "logs")
        self.project = project
        self.path = self.output_dir / METRICS_FILE
        self._file = None
        self._tb = None
        if not enabled:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        truncate_metrics(self.path, resume_step)
        self._file = open(self.path, "a", encoding="utf-8")
        for tracker in parse_report_to(report_to):
            if tracker == "tensorboard":
                self._tb = self._open_tensorboard(run_name, resume_step)
            else:
                log.warning(
                    "report_to '%s' is not supported by TuneGraph yet; metrics go to %s", tracker, self.path
                )

    def _open_tensorboard(self, run_name: str, resume_step: int):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.warning(
                "report_to 'tensorboard' needs the tensorboard package (pip install tensorboard); skipped"
            )
            return None
        logdir = self.logs_root / (self.project or "") / (run_name or "tunegraph")
        # purge_step drops events a killed run logged past the checkpoint we resume from.
        return SummaryWriter(log_dir=str(logdir), purge_step=resume_step + 1 if resume_step else None)

    @property
    def tensorboard_dir(self) -> Path | None:
        return Path(self._tb.log_dir) if self._tb is not None else None

    def log(self, step: int, **values: Any) -> dict[str, Any]:
        """Write one record {"step": step, **values}; numeric values also go to tensorboard."""
        record = {"step": int(step), **{k: _jsonable(v) for k, v in values.items()}}
        if self._file is None:
            return record
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, global_step=int(step))
        return record

    def close(self) -> None:
        if self._file is not None and not self._file.closed:
            self._file.close()
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TrainProgress:
    """Console progress bar (tqdm) with loss, lr and ETA; silent when stderr is not a terminal or
    `enabled=False`. `eta_seconds` works either way (for the nodes' progress and --json)."""

    def __init__(
        self, total_steps: int, initial_step: int = 0, *, enabled: bool | None = None, desc: str = "train"
    ):
        from tqdm.auto import tqdm

        self.total = int(total_steps)
        self.step = int(initial_step)
        self._start_step = self.step
        self._start = time.monotonic()
        if enabled is None:
            enabled = sys.stderr.isatty()
        self._bar = tqdm(
            total=self.total,
            initial=self.step,
            disable=not enabled,
            desc=desc,
            unit="step",
            dynamic_ncols=True,
        )

    @property
    def eta_seconds(self) -> float | None:
        done = self.step - self._start_step
        if done <= 0:
            return None
        rate = (time.monotonic() - self._start) / done
        return max(self.total - self.step, 0) * rate

    def update(self, n: int = 1, *, loss: float | None = None, lr: float | None = None) -> None:
        self.step += n
        postfix = {}
        if loss is not None:
            postfix["loss"] = f"{float(loss):.4g}"
        if lr is not None:
            postfix["lr"] = f"{float(lr):.3g}"
        if postfix:
            self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(n)

    def write(self, message: str) -> None:
        """Print a line without breaking the bar."""
        if self._bar.disable:
            log.info(message)
        else:
            self._bar.write(message)

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> TrainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
