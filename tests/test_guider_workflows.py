"""The bundled inference workflows' tiny twins run in a real ComfyUI: Flux + trained adapter +
AdaptiveGuider (SamplerCustomAdvanced), and HiDream + trained adapter (stock KSampler with real CFG)."""

from __future__ import annotations

import json
import re

import pytest
from comfy_server import ROOT, outcome

pytestmark = pytest.mark.comfyui

WORKFLOWS = ROOT / "workflows"


def run_twin(comfy, path: str) -> dict:
    wf = json.loads((WORKFLOWS / path).read_text())
    wf["5"]["inputs"]["steps"] = 4  # the twin trains briefly; the point here is that the graph runs
    prompt_id = comfy.queue_prompt(wf)
    messages = comfy.wait(prompt_id, 300)
    assert outcome(messages)["type"] == "execution_success", outcome(messages)
    return comfy.history(prompt_id)["outputs"]


def test_flux_adapter_adaptive_guider_twin_runs(comfy) -> None:
    outputs = run_twin(comfy, "flux/tiny_adapter_adaptive_guider.api.json")
    assert len(outputs["13"]["images"]) == 1
    reports = re.findall(r"AdaptiveGuider: (\d+)/(\d+) steps ran CFG", comfy.log_text())
    assert reports, comfy.log_text()[-2000:]
    cfg_steps, steps = map(int, reports[-1])
    assert steps == 8 and 1 <= cfg_steps <= steps - 2  # no_cfg_steps=2 in the workflow


def test_hidream_adapter_twin_runs(comfy) -> None:
    outputs = run_twin(comfy, "hidream/tiny_train_apply_sample.api.json")
    assert len(outputs["13"]["images"]) == 1
