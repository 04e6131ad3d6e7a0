"""The web panel's routes on a real ComfyUI server: history, errors, and the buttons' requests acting
on a TrainLoKr run between steps (checkpoint, stop), as the websocket events report them; PlotLoss."""

from __future__ import annotations

import json
import time
import urllib.error

import pytest
from comfy_server import ROOT, outcome

pytestmark = pytest.mark.comfyui

RUN = "web_routes"


def _workflow(steps: int) -> dict:
    api = json.loads((ROOT / "workflows" / "flux" / "tiny_train_lokr.api.json").read_text())
    api = {k: v for k, v in api.items() if k in ("1", "2", "3", "4", "5")}
    api["5"]["inputs"].update(output_name=RUN, steps=steps, checkpoint_interval=0, eval_interval=0)
    api["8"] = {
        "class_type": "TuneGraphPlotLoss",
        "inputs": {"adapter": ["5", 0], "run_name": "", "smoothing": 0.9, "log_scale": True, "title": ""},
    }
    return api


def _poll(what: str, fn, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.2)
    raise TimeoutError(f"timed out waiting for {what}")


def test_routes_refuse_what_is_not_there(comfy) -> None:
    assert comfy.get("/tunegraph/runs") == {"active": []}
    status, body = comfy.post("/tunegraph/runs/nothing_here/checkpoint")
    assert status == 404 and "not training" in body["error"]
    status, body = comfy.post("/api/tunegraph/runs/nothing_here/explode")  # the frontend's /api prefix too
    assert status == 400 and "checkpoint, validate, stop" in body["error"]
    status, body = comfy.post("/tunegraph/runs/nothing_here/metrics")
    assert status in (400, 404, 405)
    with pytest.raises(urllib.error.HTTPError) as e:
        comfy.get("/tunegraph/runs/no/such/run/metrics")
    assert e.value.code == 404 and b"output/tunegraph" in e.value.read()


def test_checkpoint_and_stop_requests_act_between_steps(comfy) -> None:
    prompt_id = comfy.queue_prompt(_workflow(400))
    active = _poll("the run to be active", lambda: comfy.get("/tunegraph/runs")["active"])
    assert active[0]["run_id"] == RUN and active[0]["node"] == "5" and active[0]["total"] == 400
    _poll("two steps", lambda: len(comfy.get(f"/api/tunegraph/runs/{RUN}/metrics")["records"]) >= 2)
    assert comfy.post(f"/tunegraph/runs/{RUN}/checkpoint") == (202, {"run_id": RUN, "queued": "checkpoint"})

    def events() -> list[dict]:
        kinds = ("tunegraph.train", "tunegraph.run")
        train = [m["data"] for m in list(comfy.messages) if m["type"] in kinds]
        return [d for d in train if d["run_id"] == RUN]

    saved = _poll("the checkpoint event", lambda: [e for e in events() if e.get("action") == "checkpoint"])
    assert comfy.post(f"/api/tunegraph/runs/{RUN}/stop")[0] == 202
    assert outcome(comfy.wait(prompt_id, timeout=240))["type"] == "execution_success"

    body = comfy.get(f"/tunegraph/runs/{RUN}/metrics")
    loss_steps = [r["step"] for r in body["records"] if r.get("loss") is not None]
    last = loss_steps[-1]
    assert loss_steps == list(range(1, last + 1)) and last < 400  # stopped early
    assert body["active"] is False and body["total"] == 400
    assert body["checkpoints"] == [saved[0]["checkpoint"], f"checkpoint-{last}"]
    # every step reached the browser as an event, then the finish
    step_events = [e for e in events() if "loss" in e]
    assert [e["step"] for e in step_events] == loss_steps
    assert step_events[0]["samples"] == 2 and step_events[0]["node"] == "5"
    assert events()[-1]["action"] == "finished" and events()[-1]["step"] == last
    assert comfy.post(f"/tunegraph/runs/{RUN}/stop")[0] == 404  # finished: nothing to stop
    # PlotLoss rendered the run's curve as an image output
    images = comfy.history(prompt_id)["outputs"]["8"]["images"]
    assert len(images) == 1 and images[0]["filename"].endswith(".png")
