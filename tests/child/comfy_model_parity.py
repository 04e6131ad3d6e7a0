"""ToComfyModel against the trainer on the tiny Flux, for tests/test_nodes_comfy_model.py.

    python -m child.comfy_model_parity <comfyui> <tmp dir>        (from tests/)

The trainer's tiny Flux handed to ComfyUI as a stock Flux model (ToComfyModel's path) predicts as the
trainer does; a LoKr saved by the trainer and loaded by ComfyUI's `load_lora_for_models` predicts as
the trainer's own adapter. Prints one JSON line of errors and scales. A child process because
ComfyUI's modules set global state (arguments, device, logging) when imported.
"""

from __future__ import annotations

import json
import sys

import torch

from child.comfy_start import lora_keys_not_loaded, start_comfy
from tunegraph.nodes.adapter_scope import clean_transformer
from tunegraph.nodes.comfy_model import to_comfy_model
from tunegraph.trainer.adapters import attach_adapter, load_adapter_file
from tunegraph.trainer.config import TrainConfig
from tunegraph.trainer.models import load_model


def comfy_pred(patcher, x, sigmas, embeds, guidance) -> torch.Tensor:
    patcher.patch_model()
    with torch.no_grad():
        out = patcher.model.diffusion_model(x, sigmas, embeds["prompt_embeds"], y=embeds["pooled_prompt_embeds"],
                                            guidance=guidance)  # fmt: skip
    patcher.unpatch_model()
    return out


def save_random_lokr(bundle, tmp: str, g: torch.Generator) -> str:
    """A full-matrix LoKr on the attention modules with random (not zero) weights, saved by the trainer."""
    with open(f"{tmp}/lyco.json", "w") as f:
        json.dump({"algo": "lokr", "linear_dim": 10000, "linear_alpha": 1, "factor": 4, "full_matrix": True,
                   "apply_preset": {"target_module": ["Attention"]}}, f)  # fmt: skip
    lcfg = TrainConfig.from_dict({"lora_type": "lycoris", "lycoris_config": f"{tmp}/lyco.json"})
    path = f"{tmp}/adapter.safetensors"
    with clean_transformer(bundle.transformer):
        adapter = attach_adapter(bundle.transformer, lcfg, bundle)
        with torch.no_grad():
            for p in adapter.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        adapter.save(path, {"family": "flux"})
    return path


def parity(tmp: str) -> dict:
    import comfy.sd
    import comfy.utils

    bundle = load_model(TrainConfig.from_dict({"model_flavour": "tiny", "seed": 3}), device="cpu",
                        dtype=torch.float32)  # fmt: skip
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 8, 12, generator=g)
    sigmas = torch.tensor([0.3, 0.8])
    embeds = bundle.encode_prompts(["a red circle", "a blue square"])
    guidance = torch.tensor([1.0, 3.5])
    with torch.no_grad():
        ours = bundle.predict(x, sigmas, embeds, guidance)
    patcher = to_comfy_model(bundle)
    base_err = (comfy_pred(patcher, x, sigmas, embeds, guidance) - ours).abs().max().item()
    path = save_random_lokr(bundle, tmp, g)
    with clean_transformer(bundle.transformer):
        load_adapter_file(path, bundle.transformer)
        with torch.no_grad():
            ours_lokr = bundle.predict(x, sigmas, embeds, guidance)
    lora = comfy.utils.load_torch_file(path, safe_load=True)
    patched, _ = comfy.sd.load_lora_for_models(patcher, None, lora, 1.0, 0)
    lokr_err = (comfy_pred(patched, x, sigmas, embeds, guidance) - ours_lokr).abs().max().item()
    return {"base_err": base_err, "lokr_err": lokr_err, "delta": (ours_lokr - ours).abs().max().item(),
            "scale": ours.abs().max().item(), "not_loaded": lora_keys_not_loaded()}  # fmt: skip


def main() -> None:
    start_comfy(sys.argv[1])
    print(json.dumps(parity(sys.argv[2])))


if __name__ == "__main__":
    main()
