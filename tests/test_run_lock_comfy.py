"""One run per output folder through a real ComfyUI server: a workflow queued twice under one output
name, a `tunegraph train` run holding the folder while the node runs, and the folder it leaves."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from comfy_server import TRAIN_NODE, outcome, tiny_train_workflow
from safetensors import safe_open

from tunegraph.trainer.commands.demo import write_demo_config
from tunegraph.trainer.config import load_config
from tunegraph.trainer.training.run import FINAL_NAME as FINAL
from tunegraph.trainer.training.run_lock import LOCK_NAME, read_holder

pytestmark = pytest.mark.comfyui


def workflow(name: str, **train_inputs) -> dict:
    """The tiny training workflow without its sampling and saving nodes (the run folder is the point)."""
    wf = tiny_train_workflow(name, 2, **train_inputs)
    del wf["6"], wf["7"]
    return wf


def metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def test_workflow_queued_twice_under_one_name_keeps_every_run(comfy) -> None:
    first, second = workflow("twice"), workflow("twice", learning_rate=2e-3)
    ids = [comfy.queue_prompt(wf) for wf in (first, second, second)]  # ComfyUI runs them one by one
    ends = [comfy.wait(i, 300) for i in ids]
    assert [outcome(m)["type"] for m in ends] == ["execution_success"] * 3, [outcome(m) for m in ends]
    cached = [m for m in ends[2] if m["type"] == "execution_cached"][0]["data"]["nodes"]
    assert TRAIN_NODE in cached  # the identical queue is ComfyUI's cache hit: it trains nothing

    run = comfy.base_dir / "output" / "tunegraph" / "twice"
    assert load_config(run / "config" / "config.json").learning_rate == 2e-3
    (old,) = (run / "superseded").iterdir()  # the first run, whole, in a folder of its own
    assert json.loads((old / "tunegraph_run.json").read_text())["identity"] == old.name.split("-")[0]
    old_cfg = load_config(old / "config" / "config.json")
    assert old_cfg.learning_rate == 1e-3
    assert metadata(old / FINAL)["config_hash"] == old_cfg.config_hash()  # its adapter, not the second's
    assert metadata(old / FINAL)["step"] == "2" and (old / "checkpoint-2" / "complete").is_file()
    assert len((old / "metrics.jsonl").read_text().splitlines()) >= 2
    assert metadata(run / FINAL)["config_hash"] == load_config(run / "config" / "config.json").config_hash()
    assert not (run / LOCK_NAME).exists()


def test_cli_run_holding_the_folder_is_a_node_error_and_its_files_stay(comfy, tmp_path: Path) -> None:
    run = comfy.base_dir / "output" / "tunegraph" / "cli_owned"
    demo = write_demo_config(tmp_path / "demo", steps=4)
    sets = {"output_dir": run, "max_train_steps": 100_000, "checkpoint_step_interval": 2,
            "validation_prompt": "", "eval_steps_interval": ""}  # fmt: skip
    cmd = [sys.executable, "-m", "tunegraph.trainer.cli", "train", "--config", str(demo)]
    log = tmp_path / "cli.log"  # a file, not a pipe: an undrained pipe would stall the CLI's progress bar
    with log.open("w") as err:
        cli = subprocess.Popen(cmd + [a for k, v in sets.items() for a in ("--set", f"{k}={v}")], stderr=err)
    try:
        deadline = time.monotonic() + 180
        # any complete checkpoint: on an idle machine checkpoint-2 is rotated away within milliseconds
        while not any(run.glob("checkpoint-*/complete")):
            assert cli.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        assert read_holder(run).pid == cli.pid
        end = outcome(comfy.run(workflow("cli_owned"), 120))
        assert end["type"] == "execution_error" and end["data"]["node_id"] == TRAIN_NODE, end
        msg = end["data"]["exception_message"]
        assert (
            "in use by another training run" in msg and f"pid {cli.pid}" in msg and "tunegraph train" in msg
        )
        assert "choose another output_name" in msg
    finally:
        cli.send_signal(signal.SIGTERM)  # stops after the step with a checkpoint, releases the lock
        cli.wait(120)
    assert cli.returncode == 130 and not (run / LOCK_NAME).exists()

    before = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    assert any(x.startswith("checkpoint-") for x in before)
    end = outcome(comfy.run(workflow("cli_owned"), 120))  # now free, but the CLI run's results are there
    assert end["type"] == "execution_error" and end["data"]["node_id"] == TRAIN_NODE, end
    msg = end["data"]["exception_message"]
    assert "no TrainLoKr run recorded" in msg and "choose another output_name" in msg
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == before  # nothing moved or deleted
