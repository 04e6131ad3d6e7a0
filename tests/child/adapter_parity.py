"""Adapter parity in stock ComfyUI, for tests/test_parity_adapters.py.

    python -m child.adapter_parity <comfyui> <tmp dir> flux,hidream        (from tests/)

For each family: the tiny model as a stock ComfyUI model (ToComfyModel's path) and from the file
`tunegraph tiny-models --comfyui` writes, against the trainer's prediction; Flux's key mapping against
ComfyUI's own converter; and adapters written by the trainer (LoKr full-matrix, LoKr decomposed, LoRA;
random weights so every wrapped module changes the output) loaded through ComfyUI's
`load_lora_for_models`, against the trainer's own adapter. Prints one JSON line of errors and counts.
A child process because ComfyUI's modules set global state (arguments, device, logging) when imported.
"""

from __future__ import annotations

import json
import os
import sys

import torch

from child.comfy_start import lora_keys_not_loaded, start_comfy
from tunegraph.nodes.adapter_scope import clean_transformer
from tunegraph.nodes.comfy_model import hidream_llama_stack, load_comfy_unet, to_comfy_model
from tunegraph.trainer.adapters import attach_adapter, load_adapter_file
from tunegraph.trainer.commands.tiny_models import write_comfyui_models
from tunegraph.trainer.config import TrainConfig
from tunegraph.trainer.models import load_model
from tunegraph.trainer.models.comfy_keys import flux_to_comfy

ATTN = {"flux": ["FluxTransformerBlock", "FluxSingleTransformerBlock"], "hidream": ["HiDreamAttention", "MOEFeedForwardSwiGLU", "HiDreamImageFeedForwardSwiGLU"]}  # fmt: skip
CASES = {
    "lokr_full": {"algo": "lokr", "linear_dim": 10000, "linear_alpha": 1, "factor": 4, "full_matrix": True},
    "lokr_decomposed": {"algo": "lokr", "linear_dim": 4, "linear_alpha": 2, "factor": 4},
    "lora": None,
}


class Inputs:
    """One family's tiny model and fixed inputs; `ours()` is the trainer's prediction, `comfy(patcher)`
    ComfyUI's diffusion model on the same inputs."""

    def __init__(self, family: str) -> None:
        self.family = family
        cfg = TrainConfig.from_dict({"model_family": family, "model_flavour": "tiny", "seed": 3})
        self.bundle = load_model(cfg, device="cpu", dtype=torch.float32)
        self.g = torch.Generator().manual_seed(0)
        # HiDream: square, since diffusers pads non-square token grids (masked keys still get softmax
        # weight) and ComfyUI does not, so the bases themselves differ there
        self.x = torch.randn(2, 16, 8, 12 if family == "flux" else 8, generator=self.g)
        self.sigmas = torch.tensor([0.3, 0.8])
        self.embeds = self.bundle.encode_prompts(["a red circle", "a blue square"])
        self.guidance = torch.tensor([1.0, 3.5])

    def ours(self) -> torch.Tensor:
        with torch.no_grad():
            return self.bundle.predict(self.x, self.sigmas, self.embeds, self.guidance)

    def comfy(self, patcher) -> torch.Tensor:
        e = self.embeds
        patcher.patch_model()
        dm = patcher.model.diffusion_model
        with torch.no_grad():
            if self.family == "flux":
                out = dm(
                    self.x,
                    self.sigmas,
                    e["prompt_embeds"],
                    y=e["pooled_prompt_embeds"],
                    guidance=self.guidance,
                )
            else:
                llama = hidream_llama_stack(self.bundle, e["llama_prompt_embeds"])
                out = dm(self.x, self.sigmas * 1000, y=e["pooled_prompt_embeds"], context=e["t5_prompt_embeds"],
                         encoder_hidden_states_llama3=llama)  # fmt: skip
        patcher.unpatch_model()
        return out


def flux_keys_equal(bundle) -> bool:
    """Our key mapping is ComfyUI's converter, key for key."""
    import comfy.model_detection

    sd = bundle.transformer.state_dict()
    theirs = comfy.model_detection.convert_diffusers_mmdit({k: v.clone() for k, v in sd.items()}, "")
    ours = flux_to_comfy(sd)
    return ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs)


def save_adapter(inp: Inputs, name: str, lyco: dict | None, tmp: str) -> str:
    """The trainer's adapter of case `name` with random weights, saved as ComfyUI would receive it."""
    family = inp.family
    if lyco is None:
        cfgd = {"lora_type": "standard", "lora_rank": 4, "lora_alpha": 8, "flux_lora_target": "all+ffs"}
    else:
        with open(f"{tmp}/{family}-{name}.json", "w") as f:
            json.dump({**lyco, "apply_preset": {"target_module": ATTN[family]}}, f)
        cfgd = {"lora_type": "lycoris", "lycoris_config": f"{tmp}/{family}-{name}.json"}
    cfg = TrainConfig.from_dict({"model_family": family, **cfgd})
    path = f"{tmp}/{family}-{name}.safetensors"
    with clean_transformer(inp.bundle.transformer):
        adapter = attach_adapter(inp.bundle.transformer, cfg, inp.bundle)
        with torch.no_grad():
            for p in adapter.parameters():
                p.copy_(torch.randn(p.shape, generator=inp.g) * 0.1)
        adapter.save(path, {"family": family})
    return path


def adapter_case(inp: Inputs, patcher, path: str, base: torch.Tensor) -> dict:
    """The adapter file in the trainer and through ComfyUI's LoRA loading: errors, keys, patches."""
    import comfy.sd
    import comfy.utils

    with clean_transformer(inp.bundle.transformer):
        load_adapter_file(path, inp.bundle.transformer)
        ours = inp.ours()
    lora = comfy.utils.load_torch_file(path, safe_load=True)
    before = lora_keys_not_loaded()
    patched, _ = comfy.sd.load_lora_for_models(patcher, None, lora, 1.0, 0)
    theirs = inp.comfy(patched)
    err = (theirs - ours).abs().max().item()
    scale = ours.abs().max().item()
    return {"abs": err, "rel": err / scale, "delta": (ours - base).abs().max().item() / scale,
            "keys": len(lora), "w2_a": sum(k.endswith("lokr_w2_a") for k in lora), "patches": len(patched.patches),
            "not_loaded": lora_keys_not_loaded() - before}  # fmt: skip


def family_results(family: str, tmp: str) -> dict:
    inp = Inputs(family)
    base = inp.ours()
    patcher = to_comfy_model(inp.bundle)
    results = {f"{family}/base": {"abs": (inp.comfy(patcher) - base).abs().max().item()}}
    # `tunegraph tiny-models --comfyui DIR`: the file ComfyUI loads gives the same model
    os.makedirs(f"{tmp}/comfyui-{family}", exist_ok=True)
    files = write_comfyui_models(f"{tmp}/comfyui-{family}", [family], seed=0)  # the tiny_model_seed
    loaded = load_comfy_unet(files[family])
    results[f"{family}/file"] = {"abs": (inp.comfy(loaded) - base).abs().max().item()}
    if family == "flux":
        results["flux/keys_equal"] = flux_keys_equal(inp.bundle)
    for name, lyco in CASES.items():
        path = save_adapter(inp, name, lyco, tmp)
        results[f"{family}/{name}"] = adapter_case(inp, patcher, path, base)
    return results


def main() -> None:
    start_comfy(sys.argv[1])
    tmp, families = sys.argv[2], sys.argv[3].split(",")
    results: dict = {}
    for family in families:
        results.update(family_results(family, tmp))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
