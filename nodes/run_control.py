"""Requests from the web panel to a run that is training: save a checkpoint, validate, stop and save.

The HTTP handlers (ComfyUI's event loop thread) queue requests by run id; the training loop (the
prompt worker thread) takes them between optimizer steps through `train(control=...)`. No ComfyUI
imports here, so the registry and `apply_requests` are unit-testable with the headless trainer.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..trainer.training.prompts import validation_prompts
from ..trainer.training.run import save_run_checkpoint
from ..trainer.training.validation import render_validation

ACTIONS = ("checkpoint", "validate", "stop")
# websocket event for what happened to a run: checkpoint, validate, stop, finished
RUN_EVENT = "tunegraph.run"

Send = Callable[[dict[str, Any]], None]


class RunControl:
    """Thread-safe: which runs are training now (with what the panel needs to find them) and the
    requests waiting for each."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active: dict[str, dict[str, Any]] = {}
        self._pending: dict[str, list[str]] = {}

    @contextlib.contextmanager
    def running(self, run_id: str, **info: Any) -> Iterator[None]:
        """Mark `run_id` as training for the duration of the block (requests before or after are refused)."""
        with self._lock:
            self._active[run_id] = {"run_id": run_id, "started": time.time(), **info}
            self._pending[run_id] = []
        try:
            yield
        finally:
            with self._lock:
                self._active.pop(run_id, None)
                self._pending.pop(run_id, None)

    def active(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(v) for v in self._active.values()]

    def is_active(self, run_id: str) -> bool:
        with self._lock:
            return run_id in self._active

    def request(self, run_id: str, action: str) -> bool:
        """Queue `action` for `run_id`; False when that run is not training. Repeats collapse into one."""
        if action not in ACTIONS:
            raise ValueError(f"unknown action {action!r}; use one of {', '.join(ACTIONS)}")
        with self._lock:
            if run_id not in self._active:
                return False
            if action not in self._pending[run_id]:
                self._pending[run_id].append(action)
            return True

    def take(self, run_id: str) -> list[str]:
        """The requests waiting for `run_id`, in arrival order; the queue is emptied."""
        with self._lock:
            pending = self._pending.get(run_id, [])
            self._pending[run_id] = []
            return pending


CONTROL = RunControl()  # one per ComfyUI process: the routes and TrainLoKr share it


def apply_requests(run: Any, actions: list[str], send: Send) -> bool:
    """Carry out `actions` on a training Run between steps; `send` reports each result to the panel.
    Returns True when the run should stop (the loop then checkpoints and saves the final files)."""
    for action in actions:
        if action == "checkpoint":
            path = Path(save_run_checkpoint(run))
            send({"action": "checkpoint", "step": run.step, "checkpoint": path.name})
        elif action == "validate":
            images = validate_now(run)
            send({"action": "validate", "step": run.step, "images": [Path(p).name for p in images]})
        elif action == "stop":
            send({"action": "stop", "step": run.step})
    return "stop" in actions


def _first_caption(run: Any) -> str:
    for dataset in run.data.cached.datasets:
        for item in dataset.items:
            if item.captions:
                return item.captions[0]
    return "a photo"


def validate_now(run: Any) -> list[str]:
    """The run's validation images at this step; a run without validation prompts (TrainLoKr sets
    none) renders its instance prompt, else its first training caption, so the button always shows
    what the adapter does now. The run's own config is left as it is (its hash goes in checkpoints)."""
    if validation_prompts(run.cfg, run.data.instance_prompt):
        return run.validate(run.step)
    cfg = run.cfg.replace(validation_prompt=run.data.instance_prompt or _first_caption(run))
    with run.ema_weights():
        paths = render_validation(cfg, run.model, run.output_dir, run.step, run.data.instance_prompt)
    return [str(p) for p in paths]


def web_run_id(run_dir: Path) -> str:
    """A run's id in the web routes and events: its folder under output/tunegraph (TrainLoKr's
    output_name), or the folder's name for a run outside it."""
    from . import paths

    try:
        return Path(run_dir).relative_to(paths.output_dir() / "tunegraph").as_posix()
    except ValueError:
        return Path(run_dir).name
