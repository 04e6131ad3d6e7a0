"""ToComfyModel: the trainer's tiny Flux as a stock ComfyUI Flux model gives the trainer's predictions,
and a trained LoKr file loaded through ComfyUI's LoRA loader matches the trainer's own adapter.

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
from tunegraph.nodes.comfy_model import to_comfy_model
from tunegraph.trainer.adapters import attach_adapter, load_adapter_file
from tunegraph.trainer.config import TrainConfig
from tunegraph.trainer.models import load_model

tmp = sys.argv[2]
cfg = TrainConfig.from_dict({"model_flavour": "tiny", "seed": 3})
bundle = load_model(cfg, device="cpu", dtype=torch.float32)
g = torch.Generator().manual_seed(0)
x = torch.randn(2, 16, 8, 12, generator=g)
sigmas = torch.tensor([0.3, 0.8])
embeds = bundle.encode_prompts(["a red circle", "a blue square"])
guidance = torch.tensor([1.0, 3.5])

def comfy_pred(patcher):
    patcher.patch_model()
    with torch.no_grad():
        out = patcher.model.diffusion_model(x, sigmas, embeds["prompt_embeds"], y=embeds["pooled_prompt_embeds"],
                                            guidance=guidance)
    patcher.unpatch_model()
    return out

with torch.no_grad():
    ours = bundle.predict(x, sigmas, embeds, guidance)
patcher = to_comfy_model(bundle)
base_err = (comfy_pred(patcher) - ours).abs().max().item()

with open(f"{tmp}/lyco.json", "w") as f:
    json.dump({"algo": "lokr", "linear_dim": 10000, "linear_alpha": 1, "factor": 4, "full_matrix": True,
               "apply_preset": {"target_module": ["Attention"]}}, f)
lcfg = TrainConfig.from_dict({"lora_type": "lycoris", "lycoris_config": f"{tmp}/lyco.json"})
with clean_transformer(bundle.transformer):
    adapter = attach_adapter(bundle.transformer, lcfg, bundle)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    adapter.save(f"{tmp}/adapter.safetensors", {"family": "flux"})
with clean_transformer(bundle.transformer):
    load_adapter_file(f"{tmp}/adapter.safetensors", bundle.transformer)
    with torch.no_grad():
        ours_lokr = bundle.predict(x, sigmas, embeds, guidance)
lora = comfy.utils.load_torch_file(f"{tmp}/adapter.safetensors", safe_load=True)
patched, _ = comfy.sd.load_lora_for_models(patcher, None, lora, 1.0, 0)
lokr_err = (comfy_pred(patched) - ours_lokr).abs().max().item()
print(json.dumps({"base_err": base_err, "lokr_err": lokr_err, "delta": (ours_lokr - ours).abs().max().item(),
                  "scale": ours.abs().max().item(), "not_loaded": logs.getvalue().count("lora key not loaded")}))
"""
)


def test_comfy_model_matches_trainer_with_and_without_lokr(tmp_path) -> None:
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(COMFY_DIR), str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["not_loaded"] == 0
    assert r["delta"] > 1e-3 * r["scale"]  # the adapter really changes the prediction
    assert r["base_err"] < 1e-5 * max(1.0, r["scale"]), r
    assert r["lokr_err"] < 1e-5 * max(1.0, r["scale"]), r
