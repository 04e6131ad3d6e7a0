"""ToComfyModel: the trainer's tiny Flux as a stock ComfyUI Flux model gives the trainer's predictions,
and a trained LoKr file loaded through ComfyUI's LoRA loader matches the trainer's own adapter.

ComfyUI is imported in a child process (its modules set global state): tests/child/comfy_model_parity.py.
"""

from __future__ import annotations

import pytest
from child.launch import child_json
from comfy_server import COMFY_DIR, comfy_available

pytestmark = pytest.mark.skipif(
    not comfy_available(), reason="no ComfyUI: run `make comfyui` or set COMFYUI_DIR"
)


def test_comfy_model_matches_trainer_with_and_without_lokr(tmp_path) -> None:
    r = child_json("comfy_model_parity", COMFY_DIR, tmp_path, timeout=300)
    assert r["not_loaded"] == 0
    assert r["delta"] > 1e-3 * r["scale"]  # the adapter really changes the prediction
    assert r["base_err"] < 1e-5 * max(1.0, r["scale"]), r
    assert r["lokr_err"] < 1e-5 * max(1.0, r["scale"]), r
