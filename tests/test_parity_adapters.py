"""Adapter parity in stock ComfyUI: an adapter file written by our trainer's adapter code, loaded through
ComfyUI's own `load_lora_for_models` onto the tiny Flux / HiDream as stock ComfyUI models, loads every
key and gives the diffusers + LyCORIS / PEFT model's output within 1e-4 relative (fp32), for LoKr
full-matrix, LoKr decomposed and LoRA. Adapter weights are random (not zero-initialised) so every
wrapped module really changes the output.

ComfyUI is imported in a child process (its modules set global state): tests/child/adapter_parity.py.
"""

from __future__ import annotations

import json

import pytest
from child.launch import child_json
from comfy_server import COMFY_DIR, comfy_available

pytestmark = pytest.mark.skipif(
    not comfy_available(), reason="no ComfyUI: run `make comfyui` or set COMFYUI_DIR"
)

CASES = [f"{f}/{c}" for f in ("flux", "hidream") for c in ("lokr_full", "lokr_decomposed", "lora")]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("parity")
    out = child_json("adapter_parity", COMFY_DIR, tmp, "flux,hidream", timeout=600)
    print(json.dumps(out, indent=1))  # the numbers, for the closing note (pytest -s)
    return out


@pytest.mark.parametrize("family", ["flux", "hidream"])
def test_base_models_match(results: dict, family: str) -> None:
    assert results[f"{family}/base"]["abs"] < 1e-5
    assert results[f"{family}/file"]["abs"] < 1e-5  # through `tiny-models --comfyui` + LoadDiffusionModel


def test_flux_key_mapping_equals_comfyui_converter(results: dict) -> None:
    assert results["flux/keys_equal"] is True


@pytest.mark.parametrize("case", CASES)
def test_adapter_loads_fully_and_matches(results: dict, case: str) -> None:
    r = results[case]
    assert r["not_loaded"] == 0
    assert r["patches"] > 0 and r["delta"] > 1e-3  # it is applied and really changes the prediction
    assert r["rel"] < 1e-4, r
    if case.endswith("lokr_decomposed"):
        assert r["w2_a"] > 0  # low-rank lokr_w2_a/_b really present (not all fell back to full matrix)
    if case.endswith("lokr_full"):
        assert r["w2_a"] == 0
