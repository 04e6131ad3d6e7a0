"""`base_model_precision: fp8-file`: an fp8 / scaled-fp8 file written by ComfyUI's own save code trains
as an fp8 base. Its Linear weights stay float8 (no full-precision copy), the forward equals ComfyUI's
own forward on the same file (<= 1e-4 relative), LyCORIS runs in bypass on top and gets gradients.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from comfy_server import comfy_available

from tunegraph.trainer.adapters import attach_adapter
from tunegraph.trainer.adapters.lycoris import is_quantised
from tunegraph.trainer.config import TrainConfig
from tunegraph.trainer.errors import ConfigError
from tunegraph.trainer.models import load_model
from tunegraph.trainer.quantize import module_bytes, quantize_model

pytestmark = pytest.mark.skipif(
    not comfy_available(), reason="no ComfyUI: run `make comfyui` or set COMFYUI_DIR"
)
TARGETS = {"flux": ["FluxTransformerBlock", "FluxSingleTransformerBlock"], "hidream": ["HiDreamAttention"]}


def _cfg(family: str, path: str, **keys) -> TrainConfig:
    return TrainConfig.from_dict({"model_family": family, "model_flavour": "tiny", "seed": 0,
                                  "pretrained_transformer_model_name_or_path": path,
                                  "base_model_precision": "fp8-file", **keys})  # fmt: skip


@pytest.mark.parametrize("fmt", ["fp8_e4m3fn", "fp8_e5m2", "scaled_fp8"])
@pytest.mark.parametrize("family", ["flux", "hidream"])
def test_fp8_base_keeps_fp8_and_equals_comfyui(comfy_files, family: str, fmt: str) -> None:
    cfg = _cfg(family, comfy_files[family][fmt])
    bundle = quantize_model(load_model(cfg), cfg)  # fp8-file is set up at load; quantize leaves it
    fp8 = [m for m in bundle.transformer.modules() if type(m).__name__ == "Fp8Linear"]
    assert fp8 and all(m.weight.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) for m in fp8)
    assert is_quantised(bundle.transformer)  # so LyCORIS goes to bypass mode
    full = load_model(TrainConfig.from_dict({"model_family": family, "model_flavour": "tiny", "seed": 0}))
    assert module_bytes(bundle.transformer) < 0.5 * module_bytes(full.transformer)  # fp8, not fp32
    saved = torch.load(Path(comfy_files["dir"]) / f"{family}-forward.pt", weights_only=False)
    i = saved["inputs"]
    with torch.no_grad():
        ours = bundle.predict(i["x"], i["sigmas"], i["embeds"], i["guidance"])
    theirs = saved["outputs"][fmt]
    assert ((ours - theirs).abs().max() / theirs.abs().max()).item() <= 1e-4


@pytest.mark.parametrize("family", ["flux", "hidream"])
def test_lycoris_trains_in_bypass_on_fp8_base(comfy_files, tmp_path, family: str) -> None:
    cfg = _cfg(family, comfy_files[family]["scaled_fp8"])
    bundle = load_model(cfg)
    before = {n: p.clone() for n, p in bundle.transformer.named_parameters()}
    lyco = tmp_path / "lokr.json"
    lyco.write_text(json.dumps({"algo": "lokr", "linear_dim": 4, "linear_alpha": 1, "factor": 4,
                                "apply_preset": {"target_module": TARGETS[family]}}))  # fmt: skip
    adapter = attach_adapter(bundle.transformer, TrainConfig.from_dict({"model_family": family, "lora_type": "lycoris", "lycoris_config": str(lyco)}), bundle)  # fmt: skip
    trainable = [p for p in adapter.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    saved = torch.load(Path(comfy_files["dir"]) / f"{family}-forward.pt", weights_only=False)
    i = saved["inputs"]
    bundle.predict(i["x"], i["sigmas"], i["embeds"], i["guidance"]).square().mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    for n, p in bundle.transformer.named_parameters():  # the fp8 base itself is never changed
        if n in before:
            assert p.dtype == before[n].dtype and torch.equal(p, before[n]), n


def test_fp8_file_precision_needs_an_fp8_file(comfy_files) -> None:
    with pytest.raises(ConfigError, match="needs an fp8 or scaled-fp8 diffusion-model file") as e:
        load_model(_cfg("flux", comfy_files["flux"]["bf16"]))
    assert Path(comfy_files["flux"]["bf16"]).name in str(e.value)


def test_fp8_file_on_a_device_without_fp8(comfy_files) -> None:
    # no such backend here: a device torch cannot use stands in; the check runs before any weight loads
    path = comfy_files["flux"]["fp8_e4m3fn"]
    with pytest.raises(ConfigError, match="cannot hold float8 tensors") as e:
        load_model(_cfg("flux", path), device="mps")
    assert Path(path).name in str(e.value) and "no_change" in str(e.value)
