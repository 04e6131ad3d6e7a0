"""memory_preset (trainer/plan/presets.py): settings picked by the plan, reported in the run's
summary and, from TrainLoKr, in the live panel's `tunegraph.train` events."""

from __future__ import annotations

from pathlib import Path

import pytest
from comfy_server import outcome

from tunegraph.trainer.commands.demo import write_demo_config
from tunegraph.trainer.config import load_config
from tunegraph.trainer.plan.check import DoesNotFit
from tunegraph.trainer.plan.estimate import GiB, build_plan
from tunegraph.trainer.plan.inputs import plan_inputs
from tunegraph.trainer.plan.presets import apply_memory_preset, default_target, widget_keys
from tunegraph.trainer.training.loop import train

TINY = {
    "train_batch_size": 8,
    "validation_resolution": "64",
    "validation_prompt": None,
    "eval_steps_interval": None,
    "checkpoint_step_interval": None,
    "max_train_steps": 2,
}


@pytest.fixture(scope="module")
def demo_config(tmp_path_factory) -> Path:
    return write_demo_config(tmp_path_factory.mktemp("demo"), steps=2)


def _cfg(demo_config: Path, out: Path, **extra):
    return load_config(demo_config, {**TINY, "output_dir": str(out), **extra})


def _peak(cfg) -> int:
    return build_plan(plan_inputs(cfg), cfg, default_target()).peak.device


def test_preset_turns_on_checkpointing_when_that_fits(demo_config: Path, tmp_path: Path) -> None:
    cfg = _cfg(demo_config, tmp_path, gradient_checkpointing=False)
    plain, ckpt = _peak(cfg), _peak(cfg.replace(gradient_checkpointing=True))
    assert ckpt < plain
    between = (plain + ckpt) / 2 / GiB
    picked = apply_memory_preset(cfg.replace(memory_preset="12", gpu_memory=between))
    assert picked.gradient_checkpointing is True and picked.base_model_precision == "no_change"
    roomy = apply_memory_preset(cfg.replace(memory_preset="80"))
    assert roomy.gradient_checkpointing is False and roomy.gpu_memory == 80  # fits as configured: unchanged

    summary = train(cfg.replace(memory_preset="12", gpu_memory=between), progress=False)
    assert summary["memory"]["memory_preset"] == "12" and summary["memory"]["gradient_checkpointing"] is True


def test_preset_that_cannot_fit_stops_with_the_plan(demo_config: Path, tmp_path: Path) -> None:
    cfg = _cfg(demo_config, tmp_path, memory_preset="12", gpu_memory=0.0001)
    with pytest.raises(DoesNotFit, match="will not fit the device memory"):
        train(cfg, progress=False)
    summary = train(cfg.replace(ignore_memory_plan=True), progress=False)  # the override trains anyway
    assert summary["steps"] == 2


def test_node_widgets_map_to_config_keys() -> None:
    assert widget_keys("16 GB", True) == {"memory_preset": "16", "ignore_memory_plan": True}
    assert (
        widget_keys("as configured")
        == widget_keys(None)
        == {"memory_preset": None, "ignore_memory_plan": False}
    )


@pytest.mark.comfyui
def test_train_node_reports_the_preset_in_its_events(comfy) -> None:
    from test_nodes_server import tiny, train_events

    wf = tiny(steps=2, output_name="preset_run", memory_preset="24 GB")
    mark = len(comfy.messages)
    messages = comfy.run(wf, 240)
    assert outcome(messages)["type"] == "execution_success", outcome(messages)["data"].get(
        "exception_message"
    )
    events = train_events(comfy, mark)
    assert events and all(e["memory"]["memory_preset"] == "24" for e in events)
    assert events[0]["memory"]["gradient_checkpointing"] is False  # the tiny model fits 24 GB as it is
    spec = comfy.object_info()["TuneGraphTrainLoKr"]["input"]["optional"]
    assert "80 GB" in str(spec["memory_preset"]) and "ignore_memory_plan" in spec
