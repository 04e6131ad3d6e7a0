"""Bundled workflows: every API workflow has a UI twin that says the same, and every value is valid
for the live server's node definitions (also the workflows that need real weights and cannot run here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from comfy_server import ROOT

from tunegraph.nodes.workflow_ui import api_summary, is_link, ui_summary

pytestmark = pytest.mark.comfyui

API_FILES = sorted((ROOT / "workflows").glob("*/*.api.json"))


@pytest.fixture(scope="module")
def object_info(comfy) -> dict:
    return comfy.object_info()


def _ui_twin(api_path: Path) -> Path:
    return api_path.with_name(api_path.name.replace(".api.json", ".json"))


def test_each_model_has_the_three_workflows_and_tiny_twins() -> None:
    names = {p.name for p in API_FILES if p.parent.name == "flux"}
    for base in ("train_lokr", "train_validate_chunks", "train_apply_sample"):
        assert {f"{base}.api.json", f"tiny_{base}.api.json"} <= names


@pytest.mark.parametrize("api_path", API_FILES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_ui_and_api_twins_agree(api_path: Path, object_info: dict) -> None:
    api = json.loads(api_path.read_text())
    ui = json.loads(_ui_twin(api_path).read_text())
    assert ui_summary(ui) == api_summary(api, object_info)  # same node types and widget values
    ui_links = set()
    by_id = {n["id"]: n for n in ui["nodes"]}
    for _, src, slot, dst, dst_slot, _kind in ui["links"]:
        ui_links.add((str(src), slot, str(dst), by_id[dst]["inputs"][dst_slot]["name"]))
    api_links = {
        (v[0], v[1], nid, name) for nid, n in api.items() for name, v in n["inputs"].items() if is_link(v)
    }
    assert ui_links == api_links


@pytest.mark.parametrize("api_path", API_FILES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_value_fits_the_node_definitions(api_path: Path, object_info: dict) -> None:
    api = json.loads(api_path.read_text())
    for nid, node in api.items():
        info = object_info[node["class_type"]]
        for name in info["input"].get("required", {}):
            assert name in node["inputs"], f"node {nid} ({node['class_type']}) lacks required input {name}"
        specs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        for name, value in node["inputs"].items():
            assert name in specs, f"node {nid}: unknown input {name}"
            if is_link(value):
                assert value[0] in api and object_info[api[value[0]]["class_type"]]["output"][value[1]]
                continue
            kind, opts = specs[name][0], (specs[name][1] if len(specs[name]) > 1 else {})
            options = kind if isinstance(kind, list) else opts.get("options") if kind == "COMBO" else None
            if options is not None and not _model_file(node["class_type"], name, value):
                assert value in options, f"node {nid}: {name}={value!r} not in {options}"
            if kind in ("INT", "FLOAT"):
                assert opts.get("min", value) <= value <= opts.get("max", value), (
                    f"node {nid}: {name}={value}"
                )


def _model_file(node_type: str, name: str, value: str) -> bool:
    """LoadTrainingModel's file combos list this install's model files: a workflow names the files
    a ComfyUI user has (flux1-dev.safetensors ...), which this test server does not."""
    from tunegraph.nodes.comfy_files import FILE_WIDGETS

    return (
        node_type == "TuneGraphLoadTrainingModel" and name in FILE_WIDGETS and value.endswith(".safetensors")
    )


def test_template_browser_copies_match(comfy) -> None:
    """ComfyUI's template browser lists only example_workflows/*.json: every UI workflow is there,
    byte-identical, and the live server offers it under the pack's name."""
    from tunegraph.nodes.workflow_ui import template_path

    ui_files = sorted(p for p in (ROOT / "workflows").glob("*/*.json") if not p.name.endswith(".api.json"))
    assert ui_files
    for ui in ui_files:
        assert template_path(ui).read_bytes() == ui.read_bytes(), ui
    listed = comfy.get("/workflow_templates")["tunegraph"]
    assert sorted(listed) == sorted(template_path(p).stem for p in ui_files)
