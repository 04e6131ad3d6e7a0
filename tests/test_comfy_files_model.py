"""Flux / HiDream transformers and the VAE from ComfyUI-format files written by ComfyUI's own save code
(tests/comfy_fixtures.py, in a child process): the module we build from each file equals the
diffusers-folder model (fp32/bf16/fp16: every weight bit for bit, outputs <= 1e-5 relative), and
from fp8 / scaled-fp8 files equals ComfyUI's own forward on the same file (<= 1e-4 relative).
Bad files are one clear ConfigError naming the file and the key.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from comfy_server import comfy_available
from safetensors.torch import save_file

from tunegraph.trainer.config import TrainConfig
from tunegraph.trainer.errors import ConfigError
from tunegraph.trainer.models import load_model
from tunegraph.trainer.models.loading import ModelSource

pytestmark = pytest.mark.skipif(
    not comfy_available(), reason="no ComfyUI: run `make comfyui` or set COMFYUI_DIR"
)
TESTS = Path(__file__).resolve().parent
FAMILIES = ("flux", "hidream")
TRANSFORMER = "pretrained_transformer_model_name_or_path"
VAE = "pretrained_vae_model_name_or_path"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "bare": torch.bfloat16}


@pytest.fixture(scope="session")
def folders(tmp_path_factory) -> dict:
    """The same tiny models (seed 0) as diffusers folders: the reference."""
    out = tmp_path_factory.mktemp("diffusers")
    for family in FAMILIES:
        load_model(_cfg(family)).save_pretrained(out / family)
    return {family: str(out / family) for family in FAMILIES}


def _cfg(family: str, **keys) -> TrainConfig:
    return TrainConfig.from_dict({"model_family": family, "model_flavour": "tiny", "seed": 0, **keys})


def _inputs(comfy_files: dict, family: str) -> dict:
    return torch.load(Path(comfy_files["dir"]) / f"{family}-forward.pt", weights_only=False)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def _predict(bundle, saved: dict) -> torch.Tensor:
    i = saved["inputs"]
    embeds = {k: v.to(bundle.dtype) for k, v in i["embeds"].items()}
    with torch.no_grad():
        return bundle.predict(i["x"], i["sigmas"], embeds, i["guidance"])


def _same_weights(ours: torch.nn.Module, ref: torch.nn.Module) -> None:
    a, b = ours.state_dict(), ref.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("fmt", ["fp32", "bf16", "fp16", "bare"])
@pytest.mark.parametrize("family", FAMILIES)
def test_transformer_file_equals_folder_model(comfy_files, folders, family: str, fmt: str) -> None:
    dtype = DTYPES[fmt]
    ref = load_model(_cfg(family, pretrained_model_name_or_path=folders[family]), dtype=dtype)
    ours = load_model(_cfg(family, pretrained_model_name_or_path=folders[family],
                           **{TRANSFORMER: comfy_files[family][fmt]}), dtype=dtype)  # fmt: skip
    _same_weights(ours.transformer, ref.transformer)
    if dtype != torch.float16:  # CPU fp16 matmuls: weights equal above is the proof
        saved = _inputs(comfy_files, family)
        assert _rel(_predict(ours, saved), _predict(ref, saved)) <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_vae_and_all_in_one_files_equal_folder_model(comfy_files, folders, family: str) -> None:
    ref = load_model(_cfg(family, pretrained_model_name_or_path=folders[family]))
    for keys in ({VAE: comfy_files[family]["vae"]},
                 {VAE: comfy_files[family]["all_in_one"], TRANSFORMER: comfy_files[family]["all_in_one"]}):  # fmt: skip
        ours = load_model(_cfg(family, pretrained_model_name_or_path=folders[family], **keys))
        _same_weights(ours.vae, ref.vae)
        _same_weights(ours.transformer, ref.transformer)
        pixels = torch.rand(1, 3, 32, 32) * 2 - 1
        assert (
            _rel(
                ours.decode_latents(ours.encode_images(pixels)), ref.decode_latents(ref.encode_images(pixels))
            )
            <= 1e-5
        )


@pytest.mark.parametrize("fmt", ["fp8_e4m3fn", "fp8_e5m2", "scaled_fp8"])
@pytest.mark.parametrize("family", FAMILIES)
def test_fp8_file_equals_comfyui_forward(comfy_files, folders, family: str, fmt: str) -> None:
    saved = _inputs(comfy_files, family)
    ours = load_model(
        _cfg(family, pretrained_model_name_or_path=folders[family], **{TRANSFORMER: comfy_files[family][fmt]})
    )
    theirs = saved["outputs"][fmt]
    assert torch.isfinite(theirs).all()  # the stock diffusers path outputs NaN on scaled fp8
    assert _rel(_predict(ours, saved), theirs) <= 1e-4
    # fp8 really changed the weights (the proof is not vacuous): the fp32 model differs
    ref = load_model(_cfg(family, pretrained_model_name_or_path=folders[family]))
    assert _rel(_predict(ref, saved), theirs) > 1e-4


def test_flavour_from_file(comfy_files) -> None:
    src = ModelSource(**{TRANSFORMER: comfy_files["flux"]["bf16"]})
    from tunegraph.trainer.models.single_file import source_flavour

    assert source_flavour("flux", src) == "dev"  # guidance_in present (the tiny Flux is dev-like)
    with pytest.raises(ConfigError, match="set model_flavour to full, dev or fast"):
        source_flavour("hidream", ModelSource(**{TRANSFORMER: comfy_files["hidream"]["bf16"]}))


# -- bad input -------------------------------------------------------------------------------------


def _load_error(family: str, path: str | Path, key: str = TRANSFORMER) -> str:
    with pytest.raises(ConfigError) as e:
        load_model(_cfg(family, **{key: str(path)}))
    msg = str(e.value)
    assert Path(path).name in msg and key in msg, msg
    return msg


def test_wrong_family_file(comfy_files) -> None:
    assert "set model_family hidream" in _load_error("flux", comfy_files["hidream"]["bf16"])
    assert "set model_family flux" in _load_error("hidream", comfy_files["flux"]["bf16"])
    assert "set it as pretrained_vae_model_name_or_path" in _load_error("flux", comfy_files["flux"]["vae"])
    assert "is not a VAE" in _load_error("flux", comfy_files["flux"]["bf16"], VAE)


def test_truncated_and_corrupt_files(comfy_files, tmp_path) -> None:
    good = Path(comfy_files["flux"]["bf16"]).read_bytes()
    truncated = tmp_path / "flux-truncated.safetensors"
    truncated.write_bytes(good[: len(good) // 2])
    assert "truncated or corrupt" in _load_error("flux", truncated)
    corrupt = tmp_path / "flux-corrupt.safetensors"
    corrupt.write_bytes(b"\x00\x01garbage" * 100)
    assert "truncated or corrupt" in _load_error("flux", corrupt)
    pickle = tmp_path / "flux.ckpt"
    shutil.copy(comfy_files["flux"]["bf16"], pickle)
    assert "not a .safetensors file" in _load_error("flux", pickle)
    assert "not found" in _load_error("flux", tmp_path / "missing.safetensors")


def test_lora_file_picked_as_model(tmp_path) -> None:
    from tunegraph.trainer.adapters import attach_adapter

    bundle = load_model(_cfg("flux"))
    adapter = attach_adapter(
        bundle.transformer, TrainConfig.from_dict({"lora_type": "standard", "lora_rank": 2}), bundle
    )
    path = adapter.save(tmp_path / "pytorch_lora_weights.safetensors", {"family": "flux"})
    assert "LoRA/LyCORIS adapter, not a model" in _load_error("flux", path)


def test_newer_quant_layout_refused(tmp_path) -> None:
    path = tmp_path / "flux-nvfp4.safetensors"
    save_file(
        {"img_in.weight": torch.zeros(2, 2), "img_in.comfy_quant": torch.zeros(3, dtype=torch.uint8)},
        str(path),
    )
    assert "newer ComfyUI per-layer quantisation" in _load_error("flux", path)


# -- adapters on the file, in stock ComfyUI ---------------------------------------------------------


def _adapters(comfy_files: dict, family: str) -> dict:
    return json.loads((Path(comfy_files["dir"]) / f"{family}-adapters.json").read_text())


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_on_file_matches_lora_loader_model_only(comfy_files, family: str) -> None:
    """Our LoKr on the file vs stock LoraLoaderModelOnly on the SAME file (tests/comfy_fixtures.py)."""
    results = _adapters(comfy_files, family)
    for fmt, r in results.items():
        assert r["not_loaded"] == 0 and r["patches"] > 0 and r["delta"] > 1e-3, (fmt, r)
    assert results["fp32"]["rel_full"] <= 1e-4
    # fp8: ComfyUI's low-VRAM mode patches in the compute dtype, as our bypass does: equal
    assert results["fp8_e4m3fn"]["rel_lowvram"] <= 1e-4
    # a full load (and scaled fp8 always) re-rounds the patched weights to fp8 (comfy/model_patcher.py
    # stochastic_rounding): off by about the fp8 rounding of the weights, never more
    for fmt in ("fp8_e4m3fn", "scaled_fp8"):
        assert results[fmt]["rel_full"] <= 2e-2, (fmt, results[fmt])


def test_diffusion_model_file_as_model_path(comfy_files) -> None:
    key = "pretrained_model_name_or_path"
    assert "set it as pretrained_transformer_model_name_or_path" in _load_error(
        "flux", comfy_files["flux"]["bf16"], key
    )
