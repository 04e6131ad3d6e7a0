"""TrainLoKr with processes=2 on a real ComfyUI server: the trainer runs as a torchrun child process
group, progress streams back, Cancel stops both ranks with a checkpoint, and queueing again resumes
to the adapter a single in-process run with the same global batch trains."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import psutil
import pytest
from comfy_server import TRAIN_NODE, outcome, tiny_train_workflow
from safetensors.torch import load_file

from tunegraph.trainer.training.run import FINAL_NAME as FINAL

pytestmark = pytest.mark.comfyui


def workflow(name: str, **train_inputs) -> dict:
    wf = tiny_train_workflow(name, 60, **train_inputs)
    wf["7"]["inputs"]["name"] = name
    return wf


def progress_values(messages: list[dict]) -> list[int]:
    return [
        m["data"]["value"] for m in messages if m["type"] == "progress" and m["data"]["node"] == TRAIN_NODE
    ]


def ranks_of(run: Path) -> list[psutil.Process]:
    """Live processes whose command line names this run's config (torchrun and its ranks)."""
    config = str(run / "config" / "config.json")
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        if config in " ".join(p.info["cmdline"] or []) and p.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(p)
    return found


def test_two_processes_cancel_resume_and_match_one_process(comfy) -> None:
    wf = workflow("ddp2", train_batch_size=1, processes=2)
    since = len(comfy.messages)
    prompt_id = comfy.queue_prompt(wf)
    comfy._wait_for(lambda: len(progress_values(comfy.messages_for(prompt_id))) >= 3, 240, "3 steps")
    run = comfy.base_dir / "output" / "tunegraph" / "ddp2"
    assert len([p for p in ranks_of(run) if "rank_main.py" in " ".join(p.cmdline())]) >= 2
    comfy.interrupt()
    messages = comfy.wait(prompt_id, 180)
    assert outcome(messages)["type"] == "execution_interrupted"
    assert not ranks_of(run)  # Cancel ended torchrun and both ranks
    ckpts = sorted(int(p.name.split("-")[1]) for p in run.glob("checkpoint-*"))
    assert len(ckpts) == 1 and 3 <= ckpts[0] < 60 and not (run / FINAL).exists()
    events = [m["data"] for m in comfy.messages[since:] if m["type"] == "tunegraph.train"]
    assert events and events[0]["processes"] == 2 and events[0]["samples"] == 2

    resumed = comfy.run(copy.deepcopy(wf), 240)
    assert outcome(resumed)["type"] == "execution_success", resumed[-1]
    assert progress_values(resumed)[-1] == 60 and progress_values(resumed)[0] > ckpts[0]
    logged = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert sorted(s for s in logged) == list(range(1, 61))  # rank 0 alone, every step once
    assert "rank 1 of 2" in (run / "logs" / "train.stderr.log").read_text()

    # one process in ComfyUI with train_batch_size 2 = the same global batch: the same adapter
    single = workflow("ddp1", train_batch_size=2)
    assert outcome(comfy.run(single, 240))["type"] == "execution_success"
    a, b = load_file(str(run / FINAL)), load_file(str(run.parent / "ddp1" / FINAL))
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"ComfyUI: 2 processes (cancelled at {ckpts[0]}, resumed) vs 1 process, max abs diff {diff:.3g}")
    assert a.keys() == b.keys() and diff < 1e-5
