"""Issue 13: text encoders and tokenizers from the files a ComfyUI user has.

Fixtures are written by ComfyUI's own CLIPSave over ComfyUI's own text-encoder modules (tests/
comfy_text_reference.py in a child process, via text_file_fixtures.py). Proofs: our tokenizer ids
equal ComfyUI's; each file's encoder gives the diffusers-folder encoder's embeddings (fp32/bf16
<= 1e-5 relative, fp16 against the same weights rounded to fp16); fp8 and scaled-fp8 files give
ComfyUI's own forward on the same file (<= 1e-4); wrong files and missing tokenizers are clear errors.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from comfy_server import COMFY_DIR, comfy_available
from safetensors.torch import load_file
from text_file_fixtures import FORMATS, IDS

from tunegraph.trainer.config import TrainConfig
from tunegraph.trainer.errors import ConfigError
from tunegraph.trainer.models import comfy_tokenizers as ct
from tunegraph.trainer.models import load_model
from tunegraph.trainer.models.text_encoder_files import load_text_encoder
from tunegraph.trainer.models.text_encoder_source import SLOTS
from tunegraph.trainer.models.weights_file import WeightsFile

pytestmark = pytest.mark.skipif(
    not comfy_available(), reason="no ComfyUI: run `make comfyui` or set COMFYUI_DIR"
)

PROMPTS = [
    "a photo of a cat",
    "Portrait of sks woman, 35mm, f/1.8, golden hour!",
    "naïve café façade — 1920s Paris, rain; umbrellas & bicycles",
    "UPPER lower MiXeD 12345 67.89 #hashtag @user",
    "a",
    "emoji 🙂 and CJK 東京 text",
]
SLOT_OF = {  # fixture name -> (family, slot index)
    "flux_clip_l": ("flux", 0), "flux_t5": ("flux", 1), "hidream_clip_l": ("hidream", 0),
    "hidream_clip_g": ("hidream", 1), "hidream_t5": ("hidream", 2), "hidream_llama": ("hidream", 3),
}  # fmt: skip


@pytest.fixture(scope="module")
def text_files(comfy_text_files) -> Path:
    return comfy_text_files


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """The tiny models as diffusers folders (what the files are compared against)."""
    out = {}
    for family in ("flux", "hidream"):
        bundle = load_model(TrainConfig.from_dict({"model_family": family, "model_flavour": "tiny"}))
        out[family] = bundle.save_pretrained(tmp_path_factory.mktemp(f"{family}-folder"))
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def _load(family: str, folder: Path | None, dtype=torch.float32, **keys):
    cfg = {"model_family": family, "model_flavour": "tiny", **keys}
    if folder is not None:
        cfg["pretrained_model_name_or_path"] = str(folder)
    return load_model(TrainConfig.from_dict(cfg, source="test config"), dtype=dtype)


def _paths(text_files: Path, family: str, fmt: str) -> dict[str, str]:
    names = [n for n, (f, _) in SLOT_OF.items() if f == family]
    return {
        f"text_encoder_{i + 1}_path": str(text_files / f"{n}_{fmt}.safetensors") for i, n in enumerate(names)
    }


# -- tokenizers -----------------------------------------------------------------------------------


def test_tokenizer_ids_equal_comfyui(tmp_path) -> None:
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(PROMPTS))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    cmd = [
        sys.executable,
        "-m",
        "comfy_text_reference",
        "tokenize",
        str(COMFY_DIR),
        str(prompts),
        str(tmp_path / "o.json"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = json.loads((tmp_path / "o.json").read_text())
    clip_l = ct.load_tokenizer(COMFY_DIR, "clip", "test")
    clip_g = ct.load_tokenizer(COMFY_DIR, "clip", "test")
    clip_g.pad_token = "!"
    t5, llama = ct.load_tokenizer(COMFY_DIR, "t5", "test"), ct.load_tokenizer(COMFY_DIR, "llama", "test")
    for i, prompt in enumerate(PROMPTS):
        assert clip_l(prompt, padding="max_length", max_length=77).input_ids == ref["clip_l"][i], prompt
        assert clip_g(prompt, padding="max_length", max_length=77).input_ids == ref["clip_g"][i], prompt
        assert t5(prompt, padding="max_length", max_length=256).input_ids == ref["t5"][i], prompt
        assert llama(prompt).input_ids == ref["llama"][i], prompt
    # HiDream pads Llama prompts with <|eot_id|> (ComfyUI's pad 128009), after <|begin_of_text|>
    padded = llama("a cat", padding="max_length", max_length=8).input_ids
    assert padded[0] == 128000 and padded[-1] == 128009 and llama.pad_token_id == 128009


def test_comfyui_root_resolution(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv("COMFYUI_DIR", raising=False)
    monkeypatch.delitem(sys.modules, "folder_paths", raising=False)
    with pytest.raises(ConfigError, match="comfyui_path"):
        ct.comfyui_root(None, "cfg.json")
    with pytest.raises(ConfigError, match=r"key 'comfyui_path'.*not a ComfyUI install"):
        ct.comfyui_root(str(tmp_path), "cfg.json")
    monkeypatch.setenv("COMFYUI_DIR", str(COMFY_DIR))
    assert ct.comfyui_root(None, "cfg.json") == COMFY_DIR
    # a ComfyUI tree without the T5 tokenizer: the error names the missing file and the key
    broken = tmp_path / "ComfyUI"
    shutil.copytree(COMFY_DIR / "comfy" / "sd1_tokenizer", broken / "comfy" / "sd1_tokenizer")
    with pytest.raises(ConfigError, match=r"comfyui_path.*t5 tokenizer is missing.*tokenizer\.json"):
        ct.load_tokenizer(ct.comfyui_root(str(broken), "cfg.json"), "t5", "cfg.json")


# -- embeddings from files equal the diffusers folder's ---------------------------------------------


@pytest.mark.parametrize("fmt", ["fp32", "bf16", "fp16"])
def test_flux_text_files_equal_folder(text_files, folders, fmt: str) -> None:
    dtype = torch.bfloat16 if fmt == "bf16" else torch.float32
    ours = _load("flux", folders["flux"], dtype, **_paths(text_files, "flux", fmt))
    ref = _load("flux", folders["flux"], dtype)
    if fmt == "fp16":  # the file holds the weights rounded to fp16
        ref.text_encoders = [m.half().float() for m in ref.text_encoders]
    assert [type(m).__name__ for m in ours.text_encoders] == ["CLIPTextModel", "T5EncoderModel"]
    a, b = ours.encode_prompts(PROMPTS[:3]), ref.encode_prompts(PROMPTS[:3])
    for key in b:
        assert _rel(a[key], b[key]) <= 1e-5, (key, _rel(a[key], b[key]))


def test_hidream_text_files_equal_folder(text_files, folders) -> None:
    ours = _load("hidream", folders["hidream"], **_paths(text_files, "hidream", "fp32"))
    ref = _load("hidream", folders["hidream"])
    assert type(ours.text_encoders[3]).__name__ == "LlamaModel"  # ComfyUI's Llama file has no lm_head
    a, b = ours.encode_prompts(PROMPTS[:3]), ref.encode_prompts(PROMPTS[:3])
    for key in b:
        assert _rel(a[key], b[key]) <= 1e-5, (key, _rel(a[key], b[key]))


FP8 = [(n, fmt) for n, (family, _) in SLOT_OF.items() for fmt in FORMATS[family] if "fp8" in fmt]


@pytest.mark.parametrize(("name", "fmt"), FP8)
def test_fp8_files_equal_comfyui(text_files, name: str, fmt: str) -> None:
    """CLIP and Llama: ComfyUI's own forward on the same file. T5: ComfyUI's T5 fixes 32 buckets and
    cannot run the tiny T5, so transformers' T5 over ComfyUI's own dequantised weights."""
    family, index = SLOT_OF[name]
    slot = SLOTS[family][index]
    path = text_files / f"{name}_{fmt}.safetensors"
    ours = load_text_encoder(
        WeightsFile.open(path, "test", f"text_encoder_{index + 1}_path"), slot, torch.float32
    )
    ref = load_file(str(text_files / f"{name}_{fmt}.reference.safetensors"))
    ids = torch.tensor(IDS)
    with torch.no_grad():
        out = ours(ids, output_hidden_states=True)
    if slot.kind == "t5":
        twin = load_text_encoder(WeightsFile.open(path, "test", "k"), slot, torch.float32)
        weights = {k.removeprefix("weight."): v for k, v in ref.items() if k.startswith("weight.")}
        weights["encoder.embed_tokens.weight"] = weights["shared.weight"]
        twin.load_state_dict(weights, strict=True)
        with torch.no_grad():
            want = twin(ids).last_hidden_state
        assert _rel(out.last_hidden_state, want) <= 1e-4
        return
    assert _rel(out.last_hidden_state, ref["forward.last_hidden_state"]) <= 1e-4
    if slot.kind.startswith("clip"):
        pooled = out.pooler_output if slot.cls.__name__ == "CLIPTextModel" else out.text_embeds
        want = ref["forward.pooled"] if slot.cls.__name__ == "CLIPTextModel" else ref["forward.projected"]
        assert _rel(pooled, want) <= 1e-4


def test_scaled_fp8_scales_are_applied(text_files) -> None:
    """The scaled file's weights are far from its raw fp8 values: without the fold they would be wrong."""
    wf = WeightsFile.open(text_files / "flux_t5_scaled_fp8.safetensors", "test", "k")
    name = "encoder.block.0.layer.0.SelfAttention.q.weight"
    assert wf.is_scaled_fp8 and wf.raw(name).dtype == torch.float8_e4m3fn
    assert _rel(wf.raw(name).float(), wf.tensor(name, torch.float32)) > 0.5


# -- bad input -------------------------------------------------------------------------------------


def _error(folder: Path | None, family: str = "flux", **keys) -> str:
    with pytest.raises(ConfigError) as info:
        _load(family, folder, **keys)
    return str(info.value)


def test_wrong_kind_file_names_key_and_file(text_files, folders) -> None:
    t5 = str(text_files / "flux_t5_bf16.safetensors")
    clip = str(text_files / "flux_clip_l_bf16.safetensors")
    msg = _error(folders["flux"], text_encoder_1_path=t5, text_encoder_2_path=clip)
    assert (
        "text_encoder_1_path" in msg and "flux_t5_bf16.safetensors" in msg and "T5" in msg and "CLIP-L" in msg
    )
    msg = _error(folders["flux"], text_encoder_1_path=clip, text_encoder_2_path=t5, text_encoder_3_path=t5)
    assert "text_encoder_3_path" in msg and "flux has 2 text encoders" in msg
    msg = _error(folders["flux"], text_encoder_1_path=clip)
    assert "text_encoder_2_path (T5-XXL)" in msg
    # a (tiny) CLIP-G where CLIP-L belongs: a CLIP, but of no CLIP-L size TuneGraph knows
    msg = _error(folders["flux"], text_encoder_1_path=str(text_files / "hidream_clip_g_bf16.safetensors"),
                 text_encoder_2_path=t5)  # fmt: skip
    assert "match no CLIP-L" in msg and "hidream_clip_g_bf16.safetensors" in msg


def test_truncated_file_is_a_clear_error(text_files, folders, tmp_path) -> None:
    good = text_files / "flux_t5_bf16.safetensors"
    bad = tmp_path / "t5xxl_fp16.safetensors"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    msg = _error(folders["flux"], text_encoder_1_path=str(text_files / "flux_clip_l_bf16.safetensors"),
                 text_encoder_2_path=str(bad))  # fmt: skip
    assert "text_encoder_2_path" in msg and "t5xxl_fp16.safetensors" in msg and "truncated" in msg


class _Shapes:
    """Names and shapes of a full-size file, without its gigabytes: what planning reads."""

    def __init__(self, shapes: dict[str, list[int]], name: str):
        self.names, self._shapes = list(shapes), shapes
        self.path, self.where = Path(name), f"test: key '{name}'"

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._shapes[name])


def test_full_size_configs_fit_comfyui_layouts(tmp_path) -> None:
    """Our shipped full-size configs build modules whose every tensor matches ComfyUI's own full-size
    CLIP-L, CLIP-G, T5-XXL and Llama 3.1 8B (built on meta in ComfyUI, names as CLIPSave writes them)."""
    from tunegraph.trainer.models.text_encoder_files import plan_text_encoder

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    out = tmp_path / "shapes.json"
    cmd = [sys.executable, "-m", "comfy_text_reference", "shapes", str(COMFY_DIR), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    layouts = json.loads(out.read_text())
    cases = [("clip_l", "flux", 0), ("clip_l", "hidream", 0), ("clip_g", "hidream", 1),
             ("t5xxl", "flux", 1), ("t5xxl", "hidream", 2), ("llama", "hidream", 3)]  # fmt: skip
    for encoder, family, index in cases:
        plan = plan_text_encoder(_Shapes(layouts[encoder], f"{encoder}.safetensors"), SLOTS[family][index])
        assert not plan.tiny, (encoder, family)
        params = dict(plan.module.state_dict())
        for name, file_name in plan.names.items():
            assert tuple(params[name].shape) == tuple(layouts[encoder][file_name]), (encoder, name)
    with pytest.raises(ConfigError, match=r"clip_g\.safetensors holds a CLIP-G .* takes the CLIP-L"):
        plan_text_encoder(_Shapes(layouts["clip_g"], "clip_g.safetensors"), SLOTS["hidream"][0])
    # HiDream's long CLIP (248 positions) takes its position count from the file
    long_clip = {**layouts["clip_l"], "text_model.embeddings.position_embedding.weight": [248, 768]}
    assert (
        plan_text_encoder(_Shapes(long_clip, "clip_l_hidream.safetensors"), SLOTS["hidream"][0]).max_positions
        == 248
    )


@pytest.mark.parametrize("family", ["flux", "hidream"])
def test_model_from_comfyui_files_only(text_files, folders, comfy_files, family: str) -> None:
    """Transformer file + ae.safetensors + text-encoder files, no diffusers folder: the same model as
    the folder (and an all-in-one checkpoint without encoders takes text_encoder_N_path beside it)."""
    keys = {"pretrained_transformer_model_name_or_path": comfy_files[family]["fp32"],
            "pretrained_vae_model_name_or_path": comfy_files[family]["vae"],
            **_paths(text_files, family, "fp32")}  # fmt: skip
    ours, ref = _load(family, None, **keys), _load(family, folders[family])
    a, b = ours.encode_prompts(PROMPTS[:2]), ref.encode_prompts(PROMPTS[:2])
    for key in b:
        assert _rel(a[key], b[key]) <= 1e-5, key
    g = torch.Generator().manual_seed(0)
    x, sigmas = torch.randn(2, 16, 8, 8, generator=g), torch.tensor([0.4, 0.7])
    with torch.no_grad():
        assert _rel(ours.predict(x, sigmas, a), ref.predict(x, sigmas, b)) <= 1e-5
    aio = {
        "pretrained_model_name_or_path": comfy_files[family]["all_in_one"],
        **_paths(text_files, family, "bf16"),
    }
    assert type(_load(family, None, **aio).text_encoders[-1]).__name__ in ("T5EncoderModel", "LlamaModel")
    msg = _error(None, family, pretrained_model_name_or_path=comfy_files[family]["all_in_one"])
    assert "text_encoder_1_path" in msg
