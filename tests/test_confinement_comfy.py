"""Path escapes through ComfyUI's API, on the real server: dataset ids (widget and uploaded
multidatabackend.json), a symlink in input/ to a folder outside, run names, and an over-long route id.
Each is a node error (or a 400) and nothing is written outside the allowed folders."""

from __future__ import annotations

import json
import urllib.error

import pytest
from comfy_server import ROOT, outcome

pytestmark = pytest.mark.comfyui


def _graph(**dataset) -> dict:
    """The tiny workflow up to Train LoKr (the output node), one step, dataset inputs changed."""
    api = json.loads((ROOT / "workflows" / "flux" / "tiny_train_lokr.api.json").read_text())
    api = {k: v for k, v in api.items() if k in ("1", "2", "3", "4", "5")}
    api["3"]["inputs"].update(dataset)
    api["5"]["inputs"].update(output_name="confinement", steps=1)
    return api


def _error(comfy, graph: dict) -> str:
    final = outcome(comfy.run(graph, 240))
    assert final["type"] == "execution_error", final
    message = final["data"]["exception_message"]
    assert "Traceback" not in message
    return message


@pytest.mark.parametrize("escape", ["../../../../escaped", "ABSOLUTE"])
def test_dataset_id_cannot_name_a_folder_outside(comfy, tmp_path, escape) -> None:
    target = tmp_path / "abs_escape" if escape == "ABSOLUTE" else comfy.base_dir / "output" / "escaped"
    dataset_id = str(target) if escape == "ABSOLUTE" else escape
    message = _error(comfy, _graph(dataset_id=dataset_id))
    assert "not a plain name" in message and "key 'id'" in message
    assert not target.exists()

    # the same id from an uploaded multidatabackend.json
    upload = comfy.base_dir / "input" / "escape_backend.json"
    upload.parent.mkdir(parents=True, exist_ok=True)
    entry = {"id": dataset_id, "type": "local", "instance_data_dir": "tunegraph_demo", "resolution": 64,
             "caption_strategy": "textfile", "crop": True, "crop_aspect": "square"}  # fmt: skip
    upload.write_text(json.dumps([entry]))
    message = _error(comfy, _graph(config_file=upload.name, instance_data_dir=""))
    assert "escape_backend.json" in message and "not a plain name" in message
    assert not target.exists()


def test_a_link_in_input_to_a_folder_outside_is_refused(comfy, tmp_path) -> None:
    outside = tmp_path / "outside_data"
    outside.mkdir()
    link = comfy.base_dir / "input" / "linked_data"
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(outside, target_is_directory=True)
    message = _error(comfy, _graph(instance_data_dir="linked_data"))
    assert "linked_data" in message and str(outside) in message and "TUNEGRAPH_ALLOWED_ROOTS" in message


@pytest.mark.parametrize("name", ["", ".", "..", "cache", "a/b", "x" * 300])
def test_output_name_is_a_plain_name(comfy, name) -> None:
    graph = _graph()
    graph["5"]["inputs"]["output_name"] = name
    message = _error(comfy, graph)
    assert "TrainLoKr: output_name" in message
    assert not (comfy.base_dir / "output" / "tunegraph" / "metrics.jsonl").exists()


def test_an_overlong_run_id_is_a_400(comfy) -> None:
    status, _ = comfy.post("/tunegraph/runs/" + "r" * 5000 + "/checkpoint")
    assert status == 404  # not training: nothing touches the file system
    try:
        comfy.get("/tunegraph/runs/" + "r" * 5000 + "/metrics")
    except urllib.error.HTTPError as e:
        assert e.code == 400 and b"too long" in e.read()
    else:
        raise AssertionError("expected a 400")


def test_a_link_inside_a_dataset_folder_to_a_file_outside_is_refused(comfy, tmp_path) -> None:
    from tunegraph.trainer.data.demo import make_demo_dataset

    secret = make_demo_dataset(tmp_path / "private", n=1, size=(64, 64))
    data = make_demo_dataset(comfy.base_dir / "input" / "linked_file_data", n=2, size=(64, 64))
    outside = next(secret.glob("*.png"))
    (data / "borrowed.png").symlink_to(outside)
    message = _error(comfy, _graph(instance_data_dir="linked_file_data"))
    assert "CacheLatents" in message and "borrowed.png" in message and str(outside) in message
    assert "TUNEGRAPH_ALLOWED_ROOTS" in message
    assert not list((comfy.base_dir / "output" / "tunegraph" / "cache").rglob("*linked_file_data*"))
