"""HTTP routes the web panel calls, registered on ComfyUI's server (PromptServer.instance.routes).

GET  /tunegraph/runs                        runs training now: [{run_id, node, run, total, started}]
GET  /tunegraph/runs/{run_id}/metrics       a run's history (metrics.jsonl), checkpoints, latest validation
POST /tunegraph/runs/{run_id}/{action}      action: checkpoint | validate | stop (202 queued, 404 not training)

A run id is the run's folder under output/tunegraph (TrainLoKr's output_name; it may contain "/").
Ids are confined like every other path from the API (no "..", nothing outside the allowed folders).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..trainer.errors import TuneGraphError
from ..trainer.training.checkpoint import list_checkpoints
from ..trainer.training.metrics import METRICS_FILE, read_metrics
from .run_control import ACTIONS, CONTROL, RunControl

_registered: set[int] = set()


def run_dir_for(run_id: str, control: RunControl = CONTROL) -> Path:
    """The folder of `run_id`: an active run's own folder, else output/tunegraph/<run_id>."""
    for info in control.active():
        if info["run_id"] == run_id and info.get("run"):
            return Path(info["run"])
    from . import paths

    return paths.output_path(str(Path("tunegraph") / run_id), "run id")


def _total_steps(run_dir: Path, active: dict[str, Any] | None) -> int | None:
    if active is not None:
        return active.get("total")
    try:
        return int(json.loads((run_dir / "config" / "config.json").read_text())["max_train_steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def latest_validation(run_dir: Path, output_root: Path) -> list[dict[str, str]]:
    """The newest validation/step-N/*.png as /view parameters (type=output), for thumbnails."""
    steps = sorted(p for p in (run_dir / "validation").glob("step-*") if p.is_dir())
    if not steps:
        return []
    try:
        subfolder = steps[-1].relative_to(output_root).as_posix()
    except ValueError:  # a run outside the output folder: /view cannot serve it
        return []
    return [
        {"filename": png.name, "subfolder": subfolder, "type": "output"}
        for png in sorted(steps[-1].glob("*.png"))
    ]


def run_history(run_id: str, output_root: Path, control: RunControl = CONTROL) -> dict[str, Any]:
    """What the panel needs to (re)draw a run: every metrics record, checkpoints, thumbnails, state."""
    run_dir = run_dir_for(run_id, control)
    active = next((a for a in control.active() if a["run_id"] == run_id), None)
    return {
        "run_id": run_id,
        "run": str(run_dir),
        "active": active is not None,
        "node": active.get("node") if active else None,
        "total": _total_steps(run_dir, active),
        "records": read_metrics(run_dir / METRICS_FILE),
        "checkpoints": [p.name for _, p in list_checkpoints(run_dir)] if run_dir.is_dir() else [],
        "validation": latest_validation(run_dir, output_root),
    }


def add_routes(routes, control: RunControl = CONTROL) -> None:
    """Add the handlers to an aiohttp RouteTableDef (ComfyUI's, or a test app's)."""
    from aiohttp import web

    from . import paths

    def error(status: int, message: str) -> web.Response:
        return web.json_response({"error": message}, status=status)

    @routes.get("/tunegraph/runs")
    async def active_runs(request: web.Request) -> web.Response:
        return web.json_response({"active": control.active()})

    @routes.get("/tunegraph/runs/{run_id:.+}/metrics")
    async def metrics(request: web.Request) -> web.Response:
        run_id = request.match_info["run_id"]
        try:
            body = run_history(run_id, paths.output_dir(), control)
        except TuneGraphError as e:  # a bad id (400), or a damaged run folder named in the message
            return error(400, str(e))
        if not body["active"] and not Path(body["run"]).is_dir():
            return error(
                404, f"no run '{run_id}' in output/tunegraph; queue a TrainLoKr with that output_name"
            )
        return web.json_response(body)

    @routes.post("/tunegraph/runs/{run_id:.+}/{action:[a-z]+}")
    async def act(request: web.Request) -> web.Response:
        run_id, action = request.match_info["run_id"], request.match_info["action"]
        if action not in ACTIONS:
            return error(400, f"unknown action '{action}'; use one of {', '.join(ACTIONS)}")
        if not control.request(run_id, action):
            return error(404, f"run '{run_id}' is not training now; nothing to {action}")
        return web.json_response({"run_id": run_id, "queued": action}, status=202)


def register() -> None:
    """Add the routes to the running ComfyUI server once (called from the extension's on_load)."""
    try:
        from server import PromptServer
    except ImportError:  # outside a ComfyUI server (unit tests, tools)
        return
    server = getattr(PromptServer, "instance", None)
    if server is None or id(server) in _registered:
        return
    add_routes(server.routes)
    _registered.add(id(server))
