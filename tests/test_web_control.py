"""The web panel's run control without a server: the request registry, the loop's `control` hook
acting on a real tiny run (checkpoint, validate, stop), the routes' history, and the log-scale plot."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tunegraph.nodes.run_control import RunControl, apply_requests
from tunegraph.nodes.web_routes import latest_validation, run_history
from tunegraph.trainer.commands.demo import write_demo_config
from tunegraph.trainer.config import load_config
from tunegraph.trainer.training.checkpoint import list_checkpoints
from tunegraph.trainer.training.loop import train
from tunegraph.trainer.training.metrics import read_metrics
from tunegraph.trainer.training.plot import plot_loss

TINY = {"validation_prompt": None, "eval_steps_interval": None, "checkpoint_step_interval": None}

# -- registry ---------------------------------------------------------------------------------------


def test_requests_reach_only_a_running_run_and_are_taken_once() -> None:
    control = RunControl()
    assert control.request("a", "checkpoint") is False  # not training: refused
    with control.running("a", node="5", total=10):
        assert [r["run_id"] for r in control.active()] == ["a"] and control.active()[0]["node"] == "5"
        assert control.request("a", "checkpoint") and control.request("a", "checkpoint")
        assert control.request("a", "stop")
        assert control.request("b", "stop") is False
        assert control.take("a") == ["checkpoint", "stop"]  # repeats collapse, order kept
        assert control.take("a") == []
        control.request("a", "validate")
    assert control.active() == [] and control.take("a") == []  # finished: pending requests dropped
    with pytest.raises(ValueError, match="checkpoint, validate, stop"):
        control.request("a", "explode")


def test_registry_is_safe_across_threads() -> None:
    control = RunControl()
    taken: list[str] = []
    with control.running("r"):
        threads = [
            threading.Thread(target=lambda a=a: [control.request("r", a) for _ in range(200)])
            for a in ("checkpoint", "validate", "stop")
        ]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            taken += control.take("r")
        for t in threads:
            t.join()
        taken += control.take("r")
    assert set(taken) == {"checkpoint", "validate", "stop"}


# -- the loop's control hook on a real tiny run -----------------------------------------------------


@pytest.fixture(scope="module")
def demo_config(tmp_path_factory) -> Path:
    return write_demo_config(tmp_path_factory.mktemp("demo"), steps=8)


def test_control_checkpoints_validates_and_stops_a_real_run(demo_config: Path, tmp_path: Path) -> None:
    cfg = load_config(demo_config, {**TINY, "output_dir": str(tmp_path), "max_train_steps": 50})
    plan = {2: ["checkpoint"], 3: ["validate", "stop"]}
    sent: list[dict] = []

    def control(run) -> bool:
        return apply_requests(run, plan.get(run.step, []), sent.append)

    summary = train(cfg, progress=False, control=control)
    assert summary["steps"] == 3  # stopped early, the final adapter written at the stop
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 3]  # requested + the stop's own
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r] == [1, 2, 3]
    assert (tmp_path / "pytorch_lora_weights.safetensors").is_file()
    assert [e["action"] for e in sent] == ["checkpoint", "validate", "stop"]
    assert sent[0] == {"action": "checkpoint", "step": 2, "checkpoint": "checkpoint-2"}
    # no validation prompt configured: "Validate now" renders the first caption instead of nothing
    assert sent[1]["images"] and (tmp_path / "validation" / "step-000003" / sent[1]["images"][0]).is_file()
    # the thumbnails the metrics route offers: /view parameters under the output folder
    shown = latest_validation(tmp_path, tmp_path.parent)
    assert shown and shown[0]["subfolder"] == f"{tmp_path.name}/validation/step-000003"
    assert shown[0]["type"] == "output"


def test_history_of_an_active_run_uses_its_own_folder(tmp_path: Path) -> None:
    run_dir = tmp_path / "anywhere" / "run"
    (run_dir / "config").mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n{"step"')
    control = RunControl()
    with control.running("my/run", node="7", run=str(run_dir), total=40):
        body = run_history("my/run", tmp_path, control)
    assert body["active"] and body["node"] == "7" and body["total"] == 40
    assert [r["step"] for r in body["records"]] == [1, 2]  # the torn last line is skipped
    assert body["checkpoints"] == [] and body["validation"] == []


# -- PlotLoss's log scale ---------------------------------------------------------------------------


def test_log_scale_changes_the_plot(tmp_path: Path) -> None:
    metrics = [{"step": i, "loss": float(10 ** (-i / 20))} for i in range(1, 80)]
    lin = np.asarray(Image.open(plot_loss(metrics, tmp_path / "lin.png")))
    log = np.asarray(Image.open(plot_loss(metrics, tmp_path / "log.png", log_scale=True)))
    assert lin.shape == log.shape and np.abs(lin.astype(int) - log.astype(int)).mean() > 1.0
    # a non-positive loss cannot go on a log axis: the plot stays linear instead of failing
    bad = [*metrics, {"step": 80, "loss": 0.0}]
    same = np.asarray(Image.open(plot_loss(bad, tmp_path / "bad.png", log_scale=True)))
    ref = np.asarray(Image.open(plot_loss(bad, tmp_path / "ref.png")))
    assert np.array_equal(same, ref)
