"""Adapter parity in stock ComfyUI: an adapter file written by our trainer's adapter code, loaded through
ComfyUI's own `load_lora_for_models` onto the tiny Flux / HiDream as stock ComfyUI models, loads every
key and gives the diffusers + LyCORIS / PEFT model's output within 1e-4 relative (fp32), for LoKr
full-matrix, LoKr decomposed and LoRA. Adapter weights are random (not zero-initialised) so every
wrapped module really changes the output.

ComfyUI is imported in a child process (its modules set global state), with COMFYUI_DIR on sys.path.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from comfy_server import COMFY_CHILD_PREAMBLE, COMFY_DIR, ROOT, comfy_available

pytestmark = pytest.mark.skipif(
    not comfy_available(), reason="no ComfyUI: run `make comfyui` or set COMFYUI_DIR"
)

SCRIPT = (
    COMFY_CHILD_PREAMBLE
    + r"""
from tunegraph.nodes.adapter_scope import clean_transformer
import comfy.model_detection
from tunegraph.nodes.comfy_model import hidream_llama_stack, load_comfy_unet, to_comfy_model
from tunegraph.trainer.commands.tiny_models import write_comfyui_models
from tunegraph.trainer.models.comfy_keys import flux_to_comfy
from tunegraph.trainer.adapters import attach_adapter, load_adapter_file
from tunegraph.trainer.config import TrainConfig
from tunegraph.trainer.models import load_model

tmp, families = sys.argv[2], sys.argv[3].split(",")
ATTN = {"flux": ["FluxTransformerBlock", "FluxSingleTransformerBlock"], "hidream": ["HiDreamAttention", "MOEFeedForwardSwiGLU", "HiDreamImageFeedForwardSwiGLU"]}
CASES = {
    "lokr_full": {"algo": "lokr", "linear_dim": 10000, "linear_alpha": 1, "factor": 4, "full_matrix": True},
    "lokr_decomposed": {"algo": "lokr", "linear_dim": 4, "linear_alpha": 2, "factor": 4},
    "lora": None,
}

def comfy_pred(family, patcher, x, sigmas, embeds, guidance, bundle):
    patcher.patch_model()
    dm = patcher.model.diffusion_model
    with torch.no_grad():
        if family == "flux":
            out = dm(x, sigmas, embeds["prompt_embeds"], y=embeds["pooled_prompt_embeds"], guidance=guidance)
        else:
            out = dm(x, sigmas * 1000, y=embeds["pooled_prompt_embeds"], context=embeds["t5_prompt_embeds"],
                     encoder_hidden_states_llama3=hidream_llama_stack(bundle, embeds["llama_prompt_embeds"]))
    patcher.unpatch_model()
    return out

results = {}
for family in families:
    bundle = load_model(TrainConfig.from_dict({"model_family": family, "model_flavour": "tiny", "seed": 3}),
                        device="cpu", dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    # HiDream: square, since diffusers pads non-square token grids (masked keys still get softmax
    # weight) and ComfyUI does not, so the bases themselves differ there
    x = torch.randn(2, 16, 8, 12 if family == "flux" else 8, generator=g)
    sigmas = torch.tensor([0.3, 0.8])
    embeds = bundle.encode_prompts(["a red circle", "a blue square"])
    guidance = torch.tensor([1.0, 3.5])
    with torch.no_grad():
        base = bundle.predict(x, sigmas, embeds, guidance)
    patcher = to_comfy_model(bundle)
    results[f"{family}/base"] = {"abs": (comfy_pred(family, patcher, x, sigmas, embeds, guidance, bundle) - base).abs().max().item()}
    # `tunegraph tiny-models --comfyui DIR`: the file ComfyUI loads gives the same model
    os.makedirs(f"{tmp}/comfyui-{family}", exist_ok=True)
    files = write_comfyui_models(f"{tmp}/comfyui-{family}", [family], seed=0)  # the tiny_model_seed
    loaded = load_comfy_unet(files[family])
    results[f"{family}/file"] = {"abs": (comfy_pred(family, loaded, x, sigmas, embeds, guidance, bundle) - base).abs().max().item()}
    if family == "flux":  # our key mapping is ComfyUI's converter, key for key
        sd = bundle.transformer.state_dict()
        theirs = comfy.model_detection.convert_diffusers_mmdit({k: v.clone() for k, v in sd.items()}, "")
        ours_sd = flux_to_comfy(sd)
        results["flux/keys_equal"] = ours_sd.keys() == theirs.keys() and all(torch.equal(ours_sd[k], theirs[k]) for k in theirs)
    for name, lyco in CASES.items():
        if lyco is None:
            cfgd = {"lora_type": "standard", "lora_rank": 4, "lora_alpha": 8, "flux_lora_target": "all+ffs"}
        else:
            with open(f"{tmp}/{family}-{name}.json", "w") as f:
                json.dump({**lyco, "apply_preset": {"target_module": ATTN[family]}}, f)
            cfgd = {"lora_type": "lycoris", "lycoris_config": f"{tmp}/{family}-{name}.json"}
        cfg = TrainConfig.from_dict({"model_family": family, **cfgd})
        path = f"{tmp}/{family}-{name}.safetensors"
        with clean_transformer(bundle.transformer):
            adapter = attach_adapter(bundle.transformer, cfg, bundle)
            with torch.no_grad():
                for p in adapter.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            adapter.save(path, {"family": family})
        with clean_transformer(bundle.transformer):
            load_adapter_file(path, bundle.transformer)
            with torch.no_grad():
                ours = bundle.predict(x, sigmas, embeds, guidance)
        lora = comfy.utils.load_torch_file(path, safe_load=True)
        before = logs.getvalue().count("lora key not loaded")
        patched, _ = comfy.sd.load_lora_for_models(patcher, None, lora, 1.0, 0)
        theirs = comfy_pred(family, patched, x, sigmas, embeds, guidance, bundle)
        err = (theirs - ours).abs().max().item()
        scale = ours.abs().max().item()
        results[f"{family}/{name}"] = {"abs": err, "rel": err / scale, "delta": (ours - base).abs().max().item() / scale,
                                       "keys": len(lora), "w2_a": sum(k.endswith("lokr_w2_a") for k in lora), "patches": len(patched.patches),
                                       "not_loaded": logs.getvalue().count("lora key not loaded") - before}
print(json.dumps(results))
"""
)

CASES = [f"{f}/{c}" for f in ("flux", "hidream") for c in ("lokr_full", "lokr_decomposed", "lora")]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("parity")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(COMFY_DIR), str(tmp), "flux,hidream"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps(out, indent=1))  # the numbers, for the closing note (pytest -s)
    return out


@pytest.mark.parametrize("family", ["flux", "hidream"])
def test_base_models_match(results: dict, family: str) -> None:
    assert results[f"{family}/base"]["abs"] < 1e-5
    assert results[f"{family}/file"]["abs"] < 1e-5  # through `tiny-models --comfyui` + LoadDiffusionModel


def test_flux_key_mapping_equals_comfyui_converter(results: dict) -> None:
    assert results["flux/keys_equal"] is True


@pytest.mark.parametrize("case", CASES)
def test_adapter_loads_fully_and_matches(results: dict, case: str) -> None:
    r = results[case]
    assert r["not_loaded"] == 0
    assert r["patches"] > 0 and r["delta"] > 1e-3  # it is applied and really changes the prediction
    assert r["rel"] < 1e-4, r
    if case.endswith("lokr_decomposed"):
        assert r["w2_a"] > 0  # low-rank lokr_w2_a/_b really present (not all fell back to full matrix)
    if case.endswith("lokr_full"):
        assert r["w2_a"] == 0
