"""SimpleTuner's loss options for flow matching: loss_type / huber_c / huber_schedule change the loss
as its models/common.py computes it; noise offset, SNR weighting, timestep bias and guidance rescale
are skipped for flow-matching models there, and so here (same losses bit for bit)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tunegraph.trainer.commands.demo import write_demo_config
from tunegraph.trainer.config import load_config
from tunegraph.trainer.training.flow import flow_loss, huber_c_per_sample
from tunegraph.trainer.training.loop import train


def test_huber_is_quadratic_near_zero_and_linear_far_out() -> None:
    sigmas = torch.tensor([0.5])
    c = 0.1
    small, big = torch.full((1, 4), 1e-2), torch.full((1, 4), 50.0)
    zero = torch.zeros(1, 4)
    huber = flow_loss(small, zero, sigmas, "huber", c, "constant")
    assert math.isclose(huber.item(), 1e-4, rel_tol=1e-2)  # ~ d^2: the same as L2 near zero
    huber = flow_loss(big, zero, sigmas, "huber", c, "constant")
    assert math.isclose(huber.item(), 2 * c * 50.0, rel_tol=1e-2)  # ~ 2c|d|: outliers count linearly
    smooth = flow_loss(big, zero, sigmas, "smooth_l1", c, "constant")
    assert math.isclose(smooth.item(), huber.item() / c, rel_tol=1e-6)
    l2 = flow_loss(big, zero, sigmas, "l2")
    assert l2.item() == torch.nn.functional.mse_loss(big, zero).item()


def test_huber_schedules_follow_simpletuner() -> None:
    s = torch.tensor([0.0, 1.0])
    exp = huber_c_per_sample(s, 0.1, "exponential")  # exp(-alpha * t), alpha = -ln(c)/1000, t = 1000 s
    assert torch.allclose(exp, torch.tensor([1.0, 0.1]))
    snr = huber_c_per_sample(s, 0.1, "snr")  # clean: ~c; pure noise: 1
    assert math.isclose(snr[0].item(), 0.9 / (1 + 100) ** 2 + 0.1, rel_tol=1e-5) and snr[1].item() == 1.0
    assert torch.equal(huber_c_per_sample(s, 0.3, "constant"), torch.tensor([0.3, 0.3]))


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return write_demo_config(tmp_path_factory.mktemp("loss"), steps=2)


def losses(demo: Path, out: Path, **overrides) -> list[float]:
    cfg = load_config(demo, {"output_dir": str(out), "validation_prompt": None, "eval_steps_interval": None,
                             "checkpoint_step_interval": None, "max_train_steps": 2, **overrides})  # fmt: skip
    train(cfg, progress=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_loss_type_changes_training_and_flow_noops_do_not(demo: Path, tmp_path: Path) -> None:
    base = losses(demo, tmp_path / "l2")
    huber = losses(demo, tmp_path / "huber", loss_type="huber", huber_schedule="constant", huber_c=0.5)
    assert len(base) == len(huber) == 2 and all(
        h < b for h, b in zip(huber, base, strict=True)
    )  # 2c(..) < d^2 here
    noops = {"noise_offset": 0.1, "noise_offset_probability": 1.0, "offset_noise": True, "snr_gamma": 5,
             "use_soft_min_snr": True, "timestep_bias_strategy": "later", "validation_guidance_rescale": 0.7}  # fmt: skip
    assert losses(demo, tmp_path / "noops", **noops) == base
