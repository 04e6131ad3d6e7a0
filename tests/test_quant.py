"""Quantised bases and text encoders on CPU: every backend's forward error, adapter training through
quantised layers, memory, kept layers, precision metadata and the errors users see."""

from __future__ import annotations

import logging
import sys

import pytest
import torch

from tunegraph.trainer.adapters import load_adapter_file, read_adapter_metadata, run_metadata
from tunegraph.trainer.adapters.lora import lora_from_config
from tunegraph.trainer.adapters.lycoris import lycoris_from_config
from tunegraph.trainer.config import TrainConfig
from tunegraph.trainer.errors import ConfigError
from tunegraph.trainer.models import load_model
from tunegraph.trainer.quantize import (
    PRECISIONS,
    module_bytes,
    module_precision,
    probe_backend,
    quantize_model,
    quantize_module,
)

BACKENDS = [p for p in PRECISIONS if p != "no_change"]
# Relative L2 error of the tiny Flux's prediction against the same model unquantised in bf16.
# Measured here (CPU, torch 2.14.1): int8 0.005, fp8 0.008, int4 0.013, nf4 0.020, int2 0.071.
TOLERANCE = {
    "int8-quanto": 0.015,
    "int8-torchao": 0.015,
    "fp8-quanto": 0.025,
    "fp8-torchao": 0.025,
    "int4-quanto": 0.04,
    "nf4-bnb": 0.06,
    "int2-quanto": 0.2,
}
LOKR = {"algo": "lokr", "factor": 4, "linear_dim": 10000, "linear_alpha": 1, "full_matrix": True,
        "apply_preset": {"target_module": ["Attention"]}}  # fmt: skip
FLUX_KEPT = ["x_embedder", "context_embedder", "proj_out", "norm_out.linear"]


def cfg(**values) -> TrainConfig:
    return TrainConfig.from_dict({"model_flavour": "tiny", "mixed_precision": "no", **values})


def inputs(model) -> tuple:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 8, 8, generator=g)
    return (
        x,
        torch.tensor([0.3, 0.7]),
        model.encode_prompts(["a red circle", "blue"]),
        torch.tensor([1.0, 1.0]),
    )


@pytest.fixture(scope="module")
def bf16_reference() -> tuple[torch.Tensor, int]:
    model = load_model(cfg())
    torch.nn.Module.to(model.transformer, dtype=torch.bfloat16)
    model.dtype = torch.bfloat16
    with torch.no_grad():
        return model.predict(*inputs(model)).float(), module_bytes(model.transformer)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("precision", BACKENDS)
def test_backend_forward_tolerance_and_lycoris_training(precision: str, bf16_reference) -> None:
    ref, ref_bytes = bf16_reference
    model = quantize_model(load_model(cfg()), cfg(base_model_precision=precision))
    assert module_precision(model.transformer) == precision and model.dtype == torch.bfloat16
    for name in FLUX_KEPT:  # embedders and output layers stay plain bf16 Linear
        layer = model.transformer.get_submodule(name)
        assert type(layer) is torch.nn.Linear and type(layer.weight.data) is torch.Tensor, name
    attn = model.transformer.transformer_blocks[0].attn.to_q
    assert type(attn) is not torch.nn.Linear or type(attn.weight.data) is not torch.Tensor
    with torch.no_grad():
        out = model.predict(*inputs(model)).float()
    err = rel_err(out, ref)
    assert 1e-4 < err < TOLERANCE[precision], err  # quantised (not identical), and close
    assert module_bytes(model.transformer) < 0.8 * ref_bytes

    # LyCORIS LoKr beside the quantised layers: bypass mode, gradient to the adapter only
    adapter = lycoris_from_config(model.transformer, LOKR, model)
    assert adapter.config["bypass_mode"] is True and len(adapter.network.loras) == 11
    for p in adapter.parameters():
        torch.nn.init.normal_(p, std=0.05)
    model.predict(*inputs(model)).float().square().mean().backward()
    grads = [p.grad for p in adapter.parameters()]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    assert not [n for n, p in model.transformer.named_parameters() if p.requires_grad]


@pytest.mark.parametrize("precision", ["int8-quanto", "nf4-bnb", "int8-torchao"])
def test_peft_lora_trains_on_quantised_layers(precision: str) -> None:
    model = quantize_model(load_model(cfg()), cfg(base_model_precision=precision))
    lora = lora_from_config(
        model.transformer,
        {"rank": 4, "alpha": 4.0, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"], "init": "gaussian"},
    )
    assert len(lora.wrapped_module_names) == 7
    for p in lora.parameters():  # lora_B starts at zero, which would give lora_A no gradient
        torch.nn.init.normal_(p, std=0.05)
    model.predict(*inputs(model)).float().square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora.parameters())


# Parameter+buffer bytes of 4 bf16 Linear(1024, 1024): weights dominate, as in a real transformer.
BYTE_RATIO = {
    "int8-quanto": (0.50, 0.51),
    "int8-torchao": (0.50, 0.51),
    "fp8-quanto": (0.50, 0.51),
    "fp8-torchao": (0.50, 0.51),
    "int4-quanto": (0.25, 0.28),  # + a scale and shift per group of 128
    "nf4-bnb": (0.25, 0.29),  # + an fp32 absmax per block of 64
    "int2-quanto": (0.125, 0.16),
}


@pytest.mark.parametrize("precision", BACKENDS)
def test_quantised_bytes_against_bf16(precision: str) -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024, bias=False) for _ in range(4)]).bfloat16()
    before = module_bytes(net)
    assert before == 4 * 1024 * 1024 * 2
    assert quantize_module(net, precision) == 4
    low, high = BYTE_RATIO[precision]
    assert low <= module_bytes(net) / before <= high, module_bytes(net) / before


def test_text_encoder_quantisation_changes_cache_id_and_stays_close() -> None:
    plain = load_model(cfg())
    model = quantize_model(load_model(cfg()), cfg(text_encoder_2_precision="int8-quanto"))
    assert module_precision(model.text_encoders[1]) == "int8-quanto"
    assert module_precision(model.text_encoders[0]) == "no_change"
    assert module_precision(model.transformer) == "no_change" and model.dtype == torch.float32
    assert model.text_encoder_id != plain.text_encoder_id and model.text_encoder_id.startswith("flux-text-")
    a, b = plain.encode_prompts(["a red circle"]), model.encode_prompts(["a red circle"])
    assert 1e-4 < rel_err(b["prompt_embeds"], a["prompt_embeds"]) < 0.02
    torch.testing.assert_close(b["pooled_prompt_embeds"], a["pooled_prompt_embeds"])  # CLIP untouched
    again = model.text_encoder_id
    quantize_model(model, cfg(text_encoder_2_precision="int8-quanto"))  # idempotent
    assert model.text_encoder_id == again


def test_hidream_keeps_embedders_final_layer_and_router(caplog) -> None:
    hid = dict(
        model_family="hidream", base_model_precision="int8-quanto", text_encoder_4_precision="int8-quanto"
    )
    ref = load_model(cfg(model_family="hidream"))
    torch.nn.Module.to(ref.transformer, dtype=torch.bfloat16)
    ref.dtype = torch.bfloat16
    model = quantize_model(load_model(cfg(model_family="hidream")), cfg(**hid))
    t = model.transformer
    for name in ["x_embedder.proj", "t_embedder.timestep_embedder.linear_1", "p_embedder.pooled_embedder.linear_2",
                 "caption_projection.0.linear", "final_layer.linear", "final_layer.adaLN_modulation.1"]:  # fmt: skip
        assert type(t.get_submodule(name)) is torch.nn.Linear, name
    block = t.double_stream_blocks[0].block
    assert type(block.ff_i.experts[0].w1).__name__ == "QLinear"
    assert type(block.attn1.to_q).__name__ == "QLinear" and type(block.ff_i.gate.weight) is torch.nn.Parameter
    assert module_precision(model.text_encoders[3]) == "int8-quanto"
    g = torch.Generator().manual_seed(0)
    x, s = torch.randn(1, 16, 8, 8, generator=g), torch.tensor([0.5])
    with torch.no_grad():
        want = ref.predict(x, s, ref.encode_prompts(["a cat"])).float()
        got = model.predict(x, s, ref.encode_prompts(["a cat"])).float()
    assert 1e-4 < rel_err(got, want) < 0.02
    with caplog.at_level(logging.WARNING, logger="tunegraph"):
        quantize_model(load_model(cfg()), cfg(text_encoder_3_precision="int8-quanto"))  # flux has 2
    assert "text_encoder_3_precision=int8-quanto ignored: flux has 2 text encoders" in caplog.text


def test_adapter_file_records_precision_and_warns_on_another_base(tmp_path, caplog) -> None:
    model = quantize_model(load_model(cfg()), cfg(base_model_precision="int8-quanto"))
    adapter = lycoris_from_config(model.transformer, LOKR, model)
    for p in adapter.parameters():
        torch.nn.init.normal_(p, std=0.05)
    meta = run_metadata(cfg(), 3, "h", base_precision=module_precision(model.transformer))
    path = adapter.save(tmp_path / "a.safetensors", meta)
    assert read_adapter_metadata(path)["base_precision"] == "int8-quanto"
    with torch.no_grad():
        trained = model.predict(*inputs(model))

    same = quantize_model(load_model(cfg()), cfg(base_model_precision="int8-quanto"))
    with caplog.at_level(logging.WARNING, logger="tunegraph"):
        loaded = load_adapter_file(path, same.transformer)
    assert "trained on a" not in caplog.text
    assert all(lora.bypass_mode for lora in loaded.network.loras)
    with torch.no_grad():
        torch.testing.assert_close(same.predict(*inputs(same)), trained)

    with caplog.at_level(logging.WARNING, logger="tunegraph"):
        load_adapter_file(path, load_model(cfg()).transformer)
    assert "trained on a int8-quanto base, but is being applied to a no_change base" in caplog.text


def test_precision_config_errors_and_already_quantised() -> None:
    with pytest.raises(ConfigError, match=r"'int8-quant' is not one of .*\(did you mean 'int8-quanto'\?\)"):
        cfg(base_model_precision="int8-quant")
    with pytest.raises(ConfigError, match="quantize_via"):
        cfg(quantize_via="gpu")
    c = cfg(base_model_precision="int4-quanto", quantize_via="cpu", base_model_default_dtype="fp32")
    assert not c.warnings
    model = quantize_model(load_model(c), c)
    assert model.dtype == torch.float32 and next(model.transformer.parameters()).dtype == torch.float32
    quantize_model(model, c)  # same precision: a no-op
    with pytest.raises(ConfigError, match="already quantised to 'int4-quanto'"):
        quantize_model(model, cfg(base_model_precision="int8-quanto"))


def test_missing_package_and_unusable_device_name_what_they_need(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)  # as if torchao were not installed
    with pytest.raises(ConfigError, match=r"'int8-torchao' needs torchao>=0.10 .*tunegraph\[quant\]"):
        quantize_model(load_model(cfg()), cfg(base_model_precision="int8-torchao"))
    with pytest.raises(
        ConfigError, match=r"'nf4-bnb' cannot train on meta here .* It needs bitsandbytes built"
    ):
        probe_backend("nf4-bnb", "meta", torch.bfloat16, "base_model_precision")


def test_linear_and_default_lycoris_targets_include_quantised_layers() -> None:
    model = quantize_model(load_model(cfg()), cfg(base_model_precision="int8-quanto"))
    quantised = sum(type(m).__name__ == "QLinear" for m in model.transformer.modules())
    plain = sum(type(m) is torch.nn.Linear for m in model.transformer.modules())
    for preset in ({"target_module": ["Linear"]}, None):
        lyco = {"algo": "lokr", "factor": 4, "linear_dim": 10000, "full_matrix": True, "apply_preset": preset}
        adapter = lycoris_from_config(model.transformer, lyco, model)
        assert len(adapter.network.loras) == quantised + plain and quantised > plain > 0
        assert adapter.config["apply_preset"]["target_module"] == ["Linear", "QLinear"]
        adapter.remove()
