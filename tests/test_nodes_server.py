"""The node pack on a real ComfyUI server (the `comfy` fixture): HTTP /prompt + websocket, end to end."""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import pytest
import torch
from comfy_server import ROOT, PromptRejected, outcome
from safetensors import safe_open
from safetensors.torch import load_file

pytestmark = pytest.mark.comfyui

WORKFLOWS = ROOT / "workflows"
TINY = WORKFLOWS / "flux" / "tiny_train_lokr.api.json"
TRAIN_NODE = "5"
FINAL = "pytorch_lora_weights.safetensors"  # TrainLoKr in the tiny workflow
NODES = {
    "TuneGraphLoadTrainingModel": [
        "model_family",
        "model_flavour",
        "diffusers_folder",
        "precision",
        "seed",
        "diffusion_model",
        "vae",
        "text_encoder_1",
        "text_encoder_2",
        "text_encoder_3",
        "text_encoder_4",
    ],
    "TuneGraphQuantizeModel": ["model", "precision"],
    "TuneGraphLoadDatasetBackend": [
        "instance_data_dir",
        "config_file",
        "caption_strategy",
        "resolution",
        "datasets",
    ],
    "TuneGraphDemoDataset": ["folder", "images", "size"],
    "TuneGraphCacheLatents": ["model", "datasets", "vae_batch_size"],
    "TuneGraphTrainLoKr": [
        "cache",
        "output_name",
        "steps",
        "learning_rate",
        "optimizer",
        "lr_scheduler",
        "flow_schedule_shift",
        "flux_guidance_value",
        "checkpoint_interval",
        "use_ema",
        "seed",
        "lycoris_config_file",
        "lokr_factor",
        "resume_from",
    ],  # fmt: skip
    "TuneGraphValidateSamples": ["model", "prompts", "negative_prompt", "guidance_real", "adapter"],
    "TuneGraphSaveAdapter": ["adapter", "name"],
    "TuneGraphApplyAdapter": ["model", "strength", "lora_name", "adapter"],
}


def tiny(**train_inputs) -> dict:
    wf = json.loads(TINY.read_text())
    wf[TRAIN_NODE]["inputs"].update(train_inputs)
    return wf


def progress_values(messages: list[dict], node: str) -> list[int]:
    return [m["data"]["value"] for m in messages if m["type"] == "progress" and m["data"]["node"] == node]


def train_events(comfy, since: int) -> list[dict]:
    return [m["data"] for m in comfy.messages[since:] if m["type"] == "tunegraph.train"]


def test_pack_imports_without_failure(comfy) -> None:
    log = comfy.log_text()
    assert "custom_nodes/tunegraph" in log
    assert not [line for line in log.splitlines() if "IMPORT FAILED" in line and "tunegraph" in line.lower()]


def test_object_info_lists_every_node_and_input(comfy) -> None:
    info = comfy.object_info()
    for node, inputs in NODES.items():
        assert node in info, f"{node} missing from /object_info"
        spec = info[node]
        assert spec["category"] == "TuneGraph"
        declared = {**spec["input"].get("required", {}), **spec["input"].get("optional", {})}
        assert set(inputs) <= set(declared), f"{node}: missing {set(inputs) - set(declared)}"
    assert info["TuneGraphTrainLoKr"]["output"] == ["TUNEGRAPH_ADAPTER", "IMAGE"]
    assert info["TuneGraphCacheLatents"]["input"]["required"]["model"][0] == "TUNEGRAPH_MODEL"


def test_tiny_training_workflow_trains_validates_and_saves(comfy) -> None:
    steps = 6
    wf = tiny(steps=steps, output_name="api_run", checkpoint_interval=3)
    wf["7"]["inputs"]["name"] = "api_run"
    mark = len(comfy.messages)
    started = time.monotonic()
    prompt_id = comfy.queue_prompt(wf)
    messages = comfy.wait(prompt_id, 240)
    wall = time.monotonic() - started
    assert outcome(messages)["type"] == "execution_success", outcome(messages)
    print(f"tiny training workflow through the API: {wall:.1f} s")

    # a ProgressBar update (and a metrics event with a real loss) after every optimizer step
    assert progress_values(messages, TRAIN_NODE) == list(range(1, steps + 1))
    events = train_events(comfy, mark)
    assert [e["step"] for e in events] == list(range(1, steps + 1))
    assert all(e["total"] == steps and math.isfinite(e["loss"]) and e["loss"] > 0 for e in events)

    lora = comfy.base_dir / "models" / "loras" / "tunegraph" / "api_run.safetensors"
    with safe_open(str(lora), "pt") as f:
        meta = f.metadata()
        assert meta["step"] == str(steps) and meta["family"] == "flux" and meta["adapter_kind"] == "lycoris"
        assert any(k.startswith("lycoris_") for k in f.keys())
    outputs = comfy.history(prompt_id)["outputs"]
    assert len(outputs["6"]["images"]) == 2  # two prompts rendered by ValidateSamples
    assert (comfy.base_dir / "output" / "tunegraph" / "api_run" / "checkpoint-3").is_dir()

    # the unchanged graph again: ComfyUI's cache answers, nothing retrains
    again = comfy.run(wf, 60)
    assert outcome(again)["type"] == "execution_success"
    assert progress_values(again, TRAIN_NODE) == []
    cached = [m for m in again if m["type"] == "execution_cached"][0]["data"]["nodes"]
    assert TRAIN_NODE in cached

    # without ComfyUI's cache (as after a restart) the finished run in the output folder is reused
    comfy.free()
    fresh = comfy.run(wf, 120)
    assert outcome(fresh)["type"] == "execution_success"
    assert any(m["type"] == "executing" and m["data"]["node"] == TRAIN_NODE for m in fresh)
    assert progress_values(fresh, TRAIN_NODE) == []

    # a changed input (learning rate) retrains from step 1
    changed = comfy.run(
        tiny(steps=steps, output_name="api_run", checkpoint_interval=3, learning_rate=5e-4), 240
    )
    assert outcome(changed)["type"] == "execution_success"
    assert progress_values(changed, TRAIN_NODE)[0] == 1


def test_quantized_base_trains_and_records_its_precision(comfy) -> None:
    wf = tiny(steps=3, output_name="quant_run", checkpoint_interval=0)
    wf["7"]["inputs"]["name"] = "quant_run"
    wf["20"] = {
        "class_type": "TuneGraphQuantizeModel",
        "inputs": {"model": ["2", 0], "precision": "int8-quanto"},
    }
    for node in wf.values():  # everything that took the loaded model now takes the quantised one
        for key, value in node["inputs"].items():
            if value == ["2", 0] and node is not wf["20"]:
                node["inputs"][key] = ["20", 0]
    messages = comfy.run(wf, 240)
    assert outcome(messages)["type"] == "execution_success", outcome(messages)["data"].get(
        "exception_message"
    )
    lora = comfy.base_dir / "models" / "loras" / "tunegraph" / "quant_run.safetensors"
    with safe_open(str(lora), "pt") as f:
        assert f.metadata()["base_precision"] == "int8-quanto"


@pytest.mark.parametrize("path", sorted(WORKFLOWS.glob("*/tiny_*.api.json")), ids=lambda p: p.stem)
def test_every_tiny_api_workflow_runs(comfy, path: Path) -> None:
    messages = comfy.run(json.loads(path.read_text()), 300)
    assert outcome(messages)["type"] == "execution_success", outcome(messages)


def test_second_chunk_continues_from_the_first_chunks_last_step(comfy) -> None:
    wf = json.loads((WORKFLOWS / "flux" / "tiny_train_validate_chunks.api.json").read_text())
    wf["5"]["inputs"]["output_name"], wf["8"]["inputs"]["output_name"] = "chunk_a", "chunk_b"
    first, total = wf["5"]["inputs"]["steps"], wf["8"]["inputs"]["steps"]
    messages = comfy.run(wf, 240)
    assert outcome(messages)["type"] == "execution_success", outcome(messages)
    assert progress_values(messages, "5") == list(range(1, first + 1))
    assert progress_values(messages, "8") == list(range(first + 1, total + 1))
    with safe_open(str(comfy.base_dir / "output" / "tunegraph" / "chunk_b" / FINAL), "pt") as f:
        assert f.metadata()["step"] == str(total)


def test_interrupt_leaves_a_checkpoint_the_next_queue_resumes(comfy) -> None:
    steps = 200  # long enough that /interrupt lands mid-run
    wf = tiny(steps=steps, output_name="interrupted", checkpoint_interval=0)
    wf["7"]["inputs"]["name"] = "interrupted"
    prompt_id = comfy.queue_prompt(wf)
    comfy._wait_for(
        lambda: len(progress_values(comfy.messages_for(prompt_id), TRAIN_NODE)) >= 3, 240, "3 steps"
    )
    comfy.interrupt()
    messages = comfy.wait(prompt_id, 120)
    assert outcome(messages)["type"] == "execution_interrupted"
    run = comfy.base_dir / "output" / "tunegraph" / "interrupted"
    ckpts = sorted(int(p.name.split("-")[1]) for p in run.glob("checkpoint-*"))
    assert len(ckpts) == 1 and 3 <= ckpts[0] < steps
    assert not (run / FINAL).exists()

    resumed = comfy.run(copy.deepcopy(wf), 240)
    assert outcome(resumed)["type"] == "execution_success"
    assert progress_values(resumed, TRAIN_NODE) == list(range(ckpts[0] + 1, steps + 1))
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert sorted(r["step"] for r in lines if "loss" in r) == list(range(1, steps + 1))

    # Cancel + resume trains exactly what one uninterrupted run trains (same data order and noise)
    straight = tiny(steps=steps, output_name="uninterrupted", checkpoint_interval=0)
    assert outcome(comfy.run(straight, 240))["type"] == "execution_success"
    a, b = load_file(str(run / FINAL)), load_file(str(run.parent / "uninterrupted" / FINAL))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("../../../etc", "contains '..'"), ("/etc", "outside the folders this server allows")],
)
def test_path_outside_allowed_roots_is_a_node_error(comfy, value: str, expected: str) -> None:
    wf = tiny()
    wf["3"]["inputs"]["instance_data_dir"] = value
    messages = comfy.run(wf, 120)
    end = outcome(messages)
    assert end["type"] == "execution_error"
    assert end["data"]["node_id"] == "3" and end["data"]["node_type"] == "TuneGraphLoadDatasetBackend"
    assert expected in end["data"]["exception_message"]
    assert "instance_data_dir" in end["data"]["exception_message"]


def test_adapter_name_climbing_out_of_loras_is_a_node_error(comfy) -> None:
    wf = tiny(steps=2, output_name="escape", checkpoint_interval=0)
    wf["7"]["inputs"]["name"] = "../../../escaped"
    end = outcome(comfy.run(wf, 120))
    assert end["type"] == "execution_error" and end["data"]["node_id"] == "7"
    assert "SaveAdapter: name" in end["data"]["exception_message"]
    assert not list(comfy.base_dir.rglob("escaped.safetensors"))


def test_unknown_combo_value_is_a_readable_node_error(comfy) -> None:
    # ComfyUI 0.3.75 does not check V3 combo values at queue time; the node names the choices
    wf = tiny()
    wf["2"]["inputs"]["model_family"] = "sdxl"
    end = outcome(comfy.run(wf, 60))
    assert end["type"] == "execution_error" and end["data"]["node_id"] == "2"
    assert "'sdxl' is not one of flux" in end["data"]["exception_message"]


def test_malformed_graph_is_rejected_at_queue_time(comfy) -> None:
    wf = tiny()
    wf["4"]["inputs"]["model"] = ["99", 0]  # a link to a node that does not exist
    with pytest.raises(PromptRejected):
        comfy.queue_prompt(wf)
