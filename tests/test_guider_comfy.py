"""AdaptiveGuider in a real ComfyUI on the tiny Flux: exactly CFGGuider at threshold 1, BasicGuider after
the switch at threshold 0, a fresh state per run (a new seed gives the same CFG-step count), the model
evaluations it saves, and the same latents as the trainer's own validation sampler.

ComfyUI is imported in a child process (its modules set global state): tests/child/guider_parity.py
computes every number in one run.
"""

from __future__ import annotations

import pytest
from child.guider_parity import STEPS
from child.launch import child_json
from comfy_server import COMFY_DIR, comfy_available

pytestmark = pytest.mark.skipif(
    not comfy_available(), reason="no ComfyUI: run `make comfyui` or set COMFYUI_DIR"
)


@pytest.fixture(scope="module")
def r() -> dict:
    return child_json("guider_parity", COMFY_DIR, timeout=300)


def test_threshold_one_is_exactly_cfg_guider(r: dict) -> None:
    assert r["t1_err"] == 0.0
    assert r["t1_cfg_steps"] == STEPS and r["evals_t1"] == r["evals_cfg"] == 2 * STEPS


def test_threshold_zero_is_basic_guider_after_the_first_cfg_step(r: dict) -> None:
    assert r["t0_cfg_steps"] == 1 and r["evals_t0"] == 2 + (STEPS - 1)
    assert r["t0_err"] < 1e-5 * r["scale"], r
    assert r["t0_vs_cfg"] > 1e-2 * r["scale"]  # and that really differs from CFG all the way


def test_new_seed_gives_the_same_cfg_steps(r: dict) -> None:
    assert r["t099_runs"][0] == r["t099_runs"][1]
    assert r["no_cfg_runs"] == [STEPS - 2, STEPS - 2]  # initial no-CFG steps from the schedule, every run


def test_threshold_099_saves_model_evaluations(r: dict) -> None:
    # the tiny model's cond/uncond similarity is ~0.9993 (printed in r["sims"]), so 0.99 switches early
    assert min(r["sims"]) > 0.99
    assert r["evals_t099"] == r["evals_t099_seed2"] == STEPS + 1 < r["evals_cfg"]


@pytest.mark.parametrize("case", ["agree", "agree_uz", "agree_full"])
def test_trainer_validation_sampler_agrees_with_comfyui(r: dict, case: str) -> None:
    c = r[case]
    assert c["comfy"] == c["ours"]
    assert c["err"] < 1e-5 * c["scale"], c
