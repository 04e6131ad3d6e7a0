"""The memory plan (trainer/plan/): activations measured on fake tensors equal the bytes a real
forward saves; optimizer state and weight sizes are exact; `tunegraph plan` and the fit check."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch

from tunegraph.trainer.adapters import attach_adapter
from tunegraph.trainer.cli import main
from tunegraph.trainer.config import TrainConfig
from tunegraph.trainer.models import ModelSource, get_family
from tunegraph.trainer.plan.activations import Shape, count_saved, measure
from tunegraph.trainer.plan.optimizer_state import scalar_state_bytes, state_bytes
from tunegraph.trainer.plan.weights import folder_params
from tunegraph.trainer.training.optim import build_optimizer

LOKR = {
    "algo": "lokr",
    "linear_dim": 10000,
    "linear_alpha": 1,
    "factor": 4,
    "apply_preset": {"target_module": ["Attention"]},
}


@pytest.fixture(scope="module")
def lyco(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("lyco") / "lycoris_config.json"
    path.write_text(json.dumps(LOKR))
    return path


def _cfg(family: str, lyco: Path, **extra) -> TrainConfig:
    keys = {
        "model_family": family,
        "model_flavour": "tiny",
        "lora_type": "lycoris",
        "lycoris_config": str(lyco),
    }
    return TrainConfig.from_dict({**keys, **extra})


def _real_saved(family: str, cfg: TrainConfig, shape: Shape, dtype: torch.dtype, ckpt: bool) -> int:
    """Bytes a real forward + loss of the tiny model keeps for backward (as the loop runs it)."""
    model = get_family(family).load(ModelSource(flavour="tiny"), dtype=dtype)
    attach_adapter(model.transformer, cfg, model)
    model.transformer.train()
    if ckpt:
        model.transformer.enable_gradient_checkpointing()
    bf16 = dtype == torch.bfloat16
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    counter = count_saved(model, shape, cfg, autocast)
    kept = counter.total
    counter.loss.backward()  # a real graph: the backward frees what it kept
    assert counter.total < kept / 10
    return kept


@pytest.mark.parametrize(
    "family,dtype,ckpt",
    [
        ("flux", torch.float32, False),
        ("flux", torch.bfloat16, True),
        ("hidream", torch.bfloat16, False),  # routed experts: the fake run shares rows evenly
        ("hidream", torch.float32, True),
    ],
)
def test_fake_activations_equal_real_saved_bytes(lyco: Path, family: str, dtype, ckpt: bool) -> None:
    cfg = _cfg(family, lyco)
    shape = Shape(batch=2, latent_h=8, latent_w=12, text_tokens=32)
    real = _real_saved(family, cfg, shape, dtype, ckpt)
    config = dict(get_family(family).load(ModelSource(flavour="tiny")).transformer.config)
    fake = measure(
        get_family(family), config, shape, cfg, dtype=dtype, target="cpu", checkpointing=ckpt, flavour="tiny"
    )
    assert fake.kept == real
    assert (fake.recompute > 0) == ckpt and fake.largest_block > 0
    if ckpt:
        assert fake.kept < fake.largest_block * 2  # only block inputs stay: far below one block per layer


def test_bypass_adapter_keeps_less_than_merged(lyco: Path) -> None:
    """A quantised base trains LoKr in bypass mode: no rebuilt full weight is kept per layer."""
    cfg, shape = _cfg("flux", lyco), Shape(1, 8, 8, 32)
    config = dict(get_family("flux").load(ModelSource(flavour="tiny")).transformer.config)
    args = dict(dtype=torch.float32, target="cpu", checkpointing=False, flavour="tiny")
    merged = measure(get_family("flux"), config, shape, cfg, **args)
    bypass = measure(get_family("flux"), config, shape, cfg, bypass=True, **args)
    assert bypass.kept != merged.kept and bypass.adapter_numels == merged.adapter_numels


@pytest.mark.parametrize("name", ["adamw", "adamw_bf16", "optimi-lion", "optimi-stableadamw", "prodigy"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_optimizer_state_bytes_exact(name: str, dtype) -> None:
    params = [torch.nn.Parameter(torch.randn(n, dtype=dtype)) for n in (7, 300, 5000)]
    opt = build_optimizer(TrainConfig.from_dict({"optimizer": name}), params)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    storages = {
        v.untyped_storage()._cdata: v.untyped_storage().nbytes()
        for s in opt.state.values()
        for v in s.values()
        if torch.is_tensor(v)
    }
    size = params[0].element_size()
    assert sum(storages.values()) == state_bytes(
        name, [p.numel() for p in params], size
    ) + scalar_state_bytes(name, len(params), size)


def test_header_sizes_equal_the_model(tmp_path: Path) -> None:
    model = get_family("flux").load(ModelSource(flavour="tiny"))
    model.save_pretrained(tmp_path / "flux")
    for name, module in [
        ("transformer", model.transformer),
        ("vae", model.vae),
        ("text_encoder_2", model.text_encoders[1]),
    ]:
        assert folder_params(tmp_path / "flux" / name) == sum(p.numel() for p in module.parameters())


def _write_config(tmp_path: Path, lyco: Path, **extra) -> Path:
    keys = {
        "model_family": "flux",
        "model_flavour": "tiny",
        "lora_type": "lycoris",
        "lycoris_config": str(lyco),
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**keys, "resolution": 64, "output_dir": str(tmp_path / "out"), **extra}))
    return path


def test_plan_cli_fits_and_does_not_fit(tmp_path: Path, lyco: Path, capsys) -> None:
    path = _write_config(tmp_path, lyco, optimizer="adamw")
    assert main(["plan", "--config", str(path), "--gpu-memory", "80", "--json", "--target", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["fits"] is True and [p["phase"] for p in out["phases"]] == [
        "load",
        "cache fill",
        "training step",
        "validation",
    ]
    train = next(p for p in out["phases"] if p["phase"] == "training step")
    parts = {p["name"]: p["device"] for p in train["parts"]}
    act = out["activations"]
    assert parts["adapter parameters"] == 4 * act["adapter_values"]
    # torch AdamW: two fp32 moments per value and a float32 step per tensor
    assert parts["optimizer state"] == 2 * parts["adapter parameters"] + 4 * act["adapter_tensors"]
    assert parts["activations"] == out["activations"]["peak"] > 0
    # a budget below the plan: the changes come in order, each re-planned
    tight = train["device_bytes"] / 2**30 * 0.999
    assert main(["plan", "--config", str(path), "--gpu-memory", str(tight), "--json", "--target", "cpu"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out.strip().splitlines()[-1])
    assert out["fits"] is False and out["changes"][0]["change"] == "turn on gradient checkpointing"
    assert "does NOT fit" in captured.err
    assert main(["plan", "--config", str(path), "--gpu-memory", "-1"]) == 2


def test_training_refuses_before_loading(tmp_path: Path, lyco: Path, monkeypatch) -> None:
    """gpu_memory known and too small: the run stops with the plan's text before any model load."""
    from tunegraph.trainer.plan.check import DoesNotFit
    from tunegraph.trainer.training import run as run_module
    from tunegraph.trainer.training.loop import train

    loads = []
    monkeypatch.setattr(run_module, "prepare_model", lambda *a, **k: loads.append(1))
    cfg = TrainConfig.from_dict(json.loads(_write_config(tmp_path, lyco, gpu_memory=0.001).read_text()))
    with pytest.raises(DoesNotFit, match="will not fit the device memory") as err:
        train(cfg, progress=False)
    assert "1. turn on gradient checkpointing" in str(err.value) and not loads
