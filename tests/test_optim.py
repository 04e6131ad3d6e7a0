"""Optimizers lower a toy loss; schedules give hand-computed learning rates; clipping is exact."""

import math

import pytest
import torch

from tunegraph.trainer.config import TrainConfig
from tunegraph.trainer.errors import ConfigError, TrainingError
from tunegraph.trainer.training.optim import (
    build_optimizer,
    build_scheduler,
    clip_gradients,
    parse_optimizer_config,
    schedule_factor,
)


def cfg(**values) -> TrainConfig:
    return TrainConfig.from_dict(values)


def toy_loss_after(optimizer_name: str, lr: float, steps: int = 30, **extra) -> tuple[float, float]:
    torch.manual_seed(0)
    target = torch.randn(8, 4)
    w = torch.nn.Parameter(torch.zeros(8, 4))
    opt = build_optimizer(cfg(optimizer=optimizer_name, learning_rate=lr, **extra), [w])
    first = None
    for _ in range(steps):
        loss = (w - target).square().mean()
        first = loss.item() if first is None else first
        loss.backward()
        opt.step()
        opt.zero_grad()
    return first, (w - target).square().mean().item()


@pytest.mark.parametrize(
    "name,lr",
    [
        ("adamw", 0.05),
        ("adamw_bf16", 0.05),
        ("optimi-lion", 0.02),
        ("optimi-stableadamw", 0.05),
        ("prodigy", 1.0),
    ],
)
def test_optimizers_lower_a_toy_loss(name, lr):
    first, last = toy_loss_after(name, lr)
    assert last < 0.5 * first, (name, first, last)


def test_adamw_uses_the_adam_keys_and_optimizer_config_overrides():
    w = torch.nn.Parameter(torch.zeros(2))
    opt = build_optimizer(cfg(optimizer="adamw", adam_beta1=0.8, adam_beta2=0.95, adam_weight_decay=0.0), [w])
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults["betas"] == (0.8, 0.95) and opt.defaults["weight_decay"] == 0.0
    opt = build_optimizer(
        cfg(optimizer="optimi-lion", optimizer_config="weight_decay=0.1,betas=(0.95,0.98)"), [w]
    )
    assert opt.defaults["weight_decay"] == 0.1 and (opt.defaults["beta1"], opt.defaults["beta2"]) == (
        0.95,
        0.98,
    )
    with pytest.raises(ConfigError, match="'momentum' is not an option of optimi-lion"):
        build_optimizer(cfg(optimizer="optimi-lion", optimizer_config="momentum=0.9"), [w])


def test_parse_optimizer_config_types():
    parsed = parse_optimizer_config("a=1, b=1e-3,c=true,d=(0.9, 0.99),e=none,f=name")
    assert parsed == {"a": 1, "b": 1e-3, "c": True, "d": (0.9, 0.99), "e": None, "f": "name"}
    with pytest.raises(ConfigError, match="not key=value"):
        parse_optimizer_config("oops")


def test_adamw_bf16_matches_torch_adamw_on_fp32_params():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(6))
    b = torch.nn.Parameter(a.detach().clone())
    opt_a = build_optimizer(cfg(optimizer="adamw_bf16", learning_rate=0.01), [a])
    opt_b = torch.optim.AdamW([b], lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    for i in range(5):
        for p, opt in ((a, opt_a), (b, opt_b)):
            p.grad = torch.full_like(p, 0.1 * (i + 1)) * torch.arange(6.0)
            opt.step()
    torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)


def test_bad_optimizer_names_and_lr_are_errors():
    w = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ConfigError, match="did you mean 'optimi-lion'"):
        build_optimizer(cfg(optimizer="optimi_lion"), w)
    with pytest.raises(ConfigError, match="learning_rate' must be > 0"):
        build_optimizer(cfg().replace(learning_rate=None), w)
    with pytest.raises(TrainingError, match="no trainable parameters"):
        build_optimizer(cfg(), [])


@pytest.mark.parametrize("name", ["bnb-lion8bit", "bnb-lion8bit-paged", "bnb-adamw8bit"])
def test_bitsandbytes_optimizers_explain_what_they_need_on_cpu(name):
    with pytest.raises(TrainingError, match="bitsandbytes") as err:
        build_optimizer(cfg(optimizer=name), [torch.nn.Parameter(torch.zeros(2))])
    assert "CUDA" in str(err.value) and "optimi-lion" in str(err.value)


def lrs(name: str, steps: list[int], **extra) -> list[float]:
    w = torch.nn.Parameter(torch.zeros(1))
    c = cfg(optimizer="adamw", learning_rate=1e-3, lr_scheduler=name, **extra)
    opt = build_optimizer(c, [w])
    sched = build_scheduler(c, opt, total_steps=100)
    out = {}
    for step in range(max(steps) + 1):
        out[step] = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
    return [out[s] for s in steps]


def test_constant_ignores_warmup():
    assert lrs("constant", [0, 5, 99], lr_warmup_steps=10) == [1e-3, 1e-3, 1e-3]


def test_constant_with_warmup_ramps_linearly():
    got = lrs("constant_with_warmup", [0, 1, 5, 10, 50], lr_warmup_steps=10)
    assert got == pytest.approx([0.0, 1e-4, 5e-4, 1e-3, 1e-3], rel=1e-12, abs=1e-15)


def test_cosine_with_warmup():
    got = lrs("cosine", [5, 10, 55, 100], lr_warmup_steps=10)
    want = [5e-4, 1e-3, 1e-3 * 0.5 * (1 + math.cos(math.pi * 0.5)), 0.0]
    assert got == pytest.approx(want, rel=1e-12, abs=1e-15)
    assert lrs("cosine", [32], lr_warmup_steps=10)[0] == pytest.approx(
        1e-3 * 0.5 * (1 + math.cos(math.pi * 22 / 90)), rel=1e-12
    )


def test_polynomial_with_lr_end_and_power():
    got = lrs("polynomial", [4, 10, 55, 100, 120], lr_warmup_steps=10, lr_end=1e-5, lr_power=2.0)
    mid = (1e-3 - 1e-5) * 0.5**2 + 1e-5
    assert got == pytest.approx([4e-4, 1e-3, mid, 1e-5, 1e-5], rel=1e-12)
    with pytest.raises(ConfigError, match="lr_end"):
        lrs("polynomial", [1], lr_end=1e-2)


def test_scheduler_state_dict_resumes_the_same_lr():
    w = torch.nn.Parameter(torch.zeros(1))
    c = cfg(optimizer="adamw", lr_scheduler="cosine", lr_warmup_steps=3)
    opt = build_optimizer(c, [w])
    sched = build_scheduler(c, opt, 20)
    for _ in range(7):
        opt.step()
        sched.step()
    state = sched.state_dict()
    opt2 = build_optimizer(c, [w])
    sched2 = build_scheduler(c, opt2, 20)
    sched2.load_state_dict(state)
    assert sched2.get_last_lr() == sched.get_last_lr()
    assert schedule_factor("cosine", 7, 3, 20, 1e-4, 4e-7, 1.0) == pytest.approx(
        0.5 * (1 + math.cos(math.pi * 4 / 17))
    )


def test_unknown_scheduler_is_an_error():
    with pytest.raises(ConfigError, match="did you mean 'cosine'"):
        cfg(lr_scheduler="cosin")


def grads_of(values: list[list[float]]) -> list[torch.nn.Parameter]:
    params = []
    for v in values:
        p = torch.nn.Parameter(torch.zeros(len(v)))
        p.grad = torch.tensor(v)
        params.append(p)
    return params


def test_clip_by_norm_returns_pre_clip_norm_and_scales():
    params = grads_of([[3.0, 0.0], [0.0, 4.0]])  # total norm 5
    norm = clip_gradients(params, 1.0, "norm")
    assert norm == pytest.approx(5.0)
    torch.testing.assert_close(params[0].grad, torch.tensor([0.6, 0.0]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(params[1].grad, torch.tensor([0.0, 0.8]), rtol=1e-5, atol=1e-6)


def test_clip_by_value_clamps_each_element():
    params = grads_of([[3.0, -0.005], [-4.0, 0.0]])
    norm = clip_gradients(params, 0.01, "value")
    assert norm == pytest.approx(math.sqrt(9 + 0.005**2 + 16))
    torch.testing.assert_close(params[0].grad, torch.tensor([0.01, -0.005]))
    torch.testing.assert_close(params[1].grad, torch.tensor([-0.01, 0.0]))
    assert clip_gradients(grads_of([[3.0, 4.0]]), 0, "norm") == pytest.approx(5.0)  # 0: no clipping
    with pytest.raises(ConfigError, match="grad_clip_method"):
        clip_gradients(params, 1.0, "max")
