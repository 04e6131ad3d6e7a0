"""Write ComfyUI-format model files with ComfyUI's OWN save code, for the single-file loading tests.

Run in a child process (ComfyUI's modules hold global state): `python -m comfy_fixtures COMFY_DIR
OUT_DIR flux,hidream` from tests/. For each family the tiny model (seed 0) is handed to ComfyUI as
a stock model_base.Flux / HiDream with its shape given explicitly (ComfyUI's detection, and so the
stock UNETLoader, fixes the full-size shapes: Flux 24 heads, HiDream's full config), then saved by
the stock ModelSave node in every weight format ComfyUI can hold:

- fp32 / bf16 / fp16, fp8_e4m3fn / fp8_e5m2: the model built with that weight dtype (what UNETLoader's
  `weight_dtype` does) and manual casting, then ModelSave (`model.diffusion_model.*` keys);
- scaled fp8: ComfyUI 0.3.75 reads and re-saves scaled fp8 (comfy/ops.py `scaled_fp8_ops`,
  model_base.state_dict_for_saving writes the `scaled_fp8` marker) but has no node that makes one
  from a bf16 model. So the per-layer scales are computed here (absmax / 448, as the published files
  do), loaded into ComfyUI's own scaled-fp8 model, and ModelSave writes the file;
- bare keys: the bf16 file with `model.diffusion_model.` stripped (BFL's own release layout);
- all-in-one: ComfyUI's save_checkpoint with the model and the VAE's LDM state dict (`vae.*`, by the
  model config's own process_vae_state_dict_for_saving);
- the VAE: ComfyUI's own diffusers->LDM conversion (comfy/diffusers_convert.py) written by VAESave's
  writer (comfy.utils.save_torch_file). ComfyUI's VAE class itself cannot hold the tiny VAE (its
  GroupNorm fixes 32 groups; the tiny VAE has 8 channels).

Each fp8 file is then loaded back the ComfyUI way and run forward on fixed inputs; the outputs go to
`OUT_DIR/<family>-forward.pt` for the tests to compare with our loader's module. And for the fp32,
fp8 and scaled-fp8 files, `adapter_parity` compares our trainer's LoKr on the file with the stock
LoraLoaderModelOnly on the same file (`OUT_DIR/<family>-adapters.json`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from child.comfy_start import lora_keys_not_loaded, start_comfy

FORMATS = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp8_e4m3fn": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2"}  # fmt: skip
SCALED = "scaled_fp8"
FP8_MAX = 448.0  # float8_e4m3fn


def comfy_model(unet: dict, sd: dict, weight_dtype, scaled: bool, strict: bool = True):
    """A ModelPatcher around a stock ComfyUI model of explicit shape `unet`, weights in `weight_dtype`
    (scaled: ComfyUI's scaled-fp8 Linear layers, as model_detection sets them up for such a file)."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models as supported
    import torch

    if unet["image_model"] == "flux":
        config = (supported.Flux if unet["guidance_embed"] else supported.FluxSchnell)(unet)
    else:
        config = supported.HiDream(unet)
    if scaled:
        config.scaled_fp8 = torch.float8_e4m3fn
        weight_dtype = torch.float32  # what load_checkpoint picks for the non-Linear layers
    device = mm.get_torch_device()
    config.set_inference_dtype(
        weight_dtype, mm.unet_manual_cast(weight_dtype, device, config.supported_inference_dtypes)
    )
    model = config.get_model(sd, "")
    missing, unexpected = model.diffusion_model.load_state_dict(sd, strict=False)
    if strict and (missing or unexpected):
        raise SystemExit(
            f"weights do not fit ComfyUI's model: missing {missing[:4]}, unexpected {unexpected[:4]}"
        )
    return comfy.model_patcher.ModelPatcher(
        model, load_device=device, offload_device=mm.unet_offload_device()
    )


def scaled_state_dict(unet: dict, sd: dict) -> dict:
    """fp8 weights + per-layer `scale_weight` for every Linear that ComfyUI's scaled-fp8 ops give a
    scale (found on ComfyUI's own module, so the layout is its)."""
    import torch

    probe = comfy_model(unet, sd, torch.float32, scaled=True, strict=False).model.diffusion_model
    out = dict(sd)
    for name, module in probe.named_modules():
        if getattr(module, "scale_weight", None) is not None and f"{name}.weight" in sd:
            w = sd[f"{name}.weight"].float()
            scale = (w.abs().max() / FP8_MAX).clamp(min=1e-12)
            out[f"{name}.weight"] = (w / scale).to(torch.float8_e4m3fn)
            out[f"{name}.scale_weight"] = scale.reshape(())
    return out


def model_save(patcher, out_dir: str, name: str, unet: dict) -> str:
    """The stock ModelSave node; our explicit shape rides in the metadata (extra_pnginfo)."""
    import folder_paths
    from comfy_extras.nodes_model_merging import ModelSave

    folder_paths.set_output_directory(out_dir)
    ModelSave().save(patcher, filename_prefix=name, extra_pnginfo={"tunegraph_unet_config": unet})
    return os.path.join(out_dir, f"{name}_00001_.safetensors")


def comfy_load(path: str):
    """Load a saved file the ComfyUI way (explicit shape from its metadata): (ModelPatcher, unet config)."""
    import comfy.model_detection
    import comfy.utils
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        unet = json.loads(f.metadata()["tunegraph_unet_config"])
    sd = comfy.utils.load_torch_file(path, safe_load=True)
    prefix = comfy.model_detection.unet_prefix_from_state_dict(sd)
    sd = comfy.utils.state_dict_prefix_replace(sd, {prefix: ""}, filter_keys=True)
    scaled = sd.pop("scaled_fp8", None) is not None  # as model_detection.model_config_from_unet
    return comfy_model(unet, sd, comfy.utils.weight_dtype(sd), scaled), unet


def comfy_run(dm, unet: dict, bundle, inputs: dict):
    """ComfyUI's diffusion model forward on the test inputs (our predict's layout)."""
    import torch

    from tunegraph.nodes.comfy_model import hidream_llama_stack

    e = inputs["embeds"]
    with torch.no_grad():
        if unet["image_model"] == "flux":
            return dm(
                inputs["x"],
                inputs["sigmas"],
                e["prompt_embeds"],
                y=e["pooled_prompt_embeds"],
                guidance=inputs["guidance"],
            )
        llama = hidream_llama_stack(bundle, e["llama_prompt_embeds"])
        return dm(inputs["x"], inputs["sigmas"] * 1000, y=e["pooled_prompt_embeds"], context=e["t5_prompt_embeds"],
                  encoder_hidden_states_llama3=llama)  # fmt: skip


def comfy_forward(path: str, bundle, inputs: dict):
    patcher, unet = comfy_load(path)
    return comfy_run(patcher.model.diffusion_model, unet, bundle, inputs)


ATTN = {"flux": ["FluxTransformerBlock", "FluxSingleTransformerBlock"], "hidream": ["HiDreamAttention"]}


def adapter_parity(family: str, path: str, fp8: bool, inputs: dict, out_dir: str) -> dict:
    """Our trainer: the model from `path` (as an fp8 base for fp8 files), a LoKr with random weights
    (every wrapped module changes the output), saved, and its prediction. ComfyUI: the SAME file
    through its loader, the adapter through the stock LoraLoaderModelOnly node, its forward. fp8:
    ComfyUI's full load re-rounds patched weights to fp8 (comfy/model_patcher.py), its low-VRAM mode
    patches on the fly in the compute dtype as our bypass does; both are reported."""
    import folder_paths
    import torch

    import nodes
    from tunegraph.trainer.adapters import attach_adapter
    from tunegraph.trainer.config import TrainConfig
    from tunegraph.trainer.models import load_model

    name = os.path.basename(path).replace(".safetensors", "")
    cfg = {
        "model_family": family,
        "model_flavour": "tiny",
        "seed": 0,
        "pretrained_transformer_model_name_or_path": path,
    }
    bundle = load_model(
        TrainConfig.from_dict({**cfg, **({"base_model_precision": "fp8-file"} if fp8 else {})})
    )
    lyco = os.path.join(out_dir, f"{name}-lokr.json")
    with open(lyco, "w") as f:
        json.dump({"algo": "lokr", "linear_dim": 10000, "linear_alpha": 1, "factor": 4, "full_matrix": True,
                   "apply_preset": {"target_module": ATTN[family]}}, f)  # fmt: skip
    adapter = attach_adapter(bundle.transformer, TrainConfig.from_dict({"model_family": family, "lora_type": "lycoris", "lycoris_config": lyco}), bundle)  # fmt: skip
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        base = bundle.predict(inputs["x"], inputs["sigmas"], inputs["embeds"], inputs["guidance"])
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        ours = bundle.predict(inputs["x"], inputs["sigmas"], inputs["embeds"], inputs["guidance"])
    lora_dir = os.path.join(out_dir, "loras")
    os.makedirs(lora_dir, exist_ok=True)
    adapter.save(os.path.join(lora_dir, f"{name}-lokr.safetensors"), {"family": family})
    folder_paths.add_model_folder_path("loras", lora_dir)
    patcher, unet = comfy_load(path)
    before = lora_keys_not_loaded()
    (patched,) = nodes.LoraLoaderModelOnly().load_lora_model_only(patcher, f"{name}-lokr.safetensors", 1.0)
    result = {
        "not_loaded": lora_keys_not_loaded() - before,
        "patches": len(patched.patches),
    }
    scale = ours.abs().max().item()
    result["delta"] = (ours - base).abs().max().item() / scale
    for mode, lowvram in (("full", 0), ("lowvram", 1)):
        with torch.inference_mode():  # as ComfyUI runs every node
            patched.patch_model(lowvram_model_memory=lowvram)
            theirs = comfy_run(patched.model.diffusion_model, unet, bundle, inputs)
            patched.unpatch_model()
        result[f"rel_{mode}"] = (theirs - ours).abs().max().item() / scale
    return result


def write_family(family: str, out_dir: str) -> dict:
    import comfy.diffusers_convert
    import comfy.sd
    import comfy.utils
    import torch
    from safetensors.torch import load_file, save_file

    from tunegraph.nodes.comfy_model import comfy_state_dict
    from tunegraph.trainer.config import TrainConfig
    from tunegraph.trainer.models import load_model
    from tunegraph.trainer.models.comfy_keys import unet_config

    bundle = load_model(TrainConfig.from_dict({"model_family": family, "model_flavour": "tiny", "seed": 0}))
    unet = unet_config(family, bundle.transformer)
    sd = comfy_state_dict(bundle.transformer, family)
    files = {}
    for fmt, dtype_name in FORMATS.items():
        patcher = comfy_model(unet, sd, getattr(torch, dtype_name), scaled=False)
        files[fmt] = model_save(patcher, out_dir, f"{family}-{fmt}", unet)
    patcher = comfy_model(unet, scaled_state_dict(unet, sd), None, scaled=True)
    files[SCALED] = model_save(patcher, out_dir, f"{family}-{SCALED}", unet)
    # BFL's own release layout: the same tensors without `model.diffusion_model.`
    bf16 = load_file(files["bf16"])
    files["bare"] = os.path.join(out_dir, f"{family}-bare.safetensors")
    save_file({k.removeprefix("model.diffusion_model."): v for k, v in bf16.items()}, files["bare"],
              metadata={"tunegraph_unet_config": json.dumps(unet)})  # fmt: skip
    # the VAE (VAESave's writer over ComfyUI's diffusers->LDM conversion) and an all-in-one file
    vae_sd = comfy.diffusers_convert.convert_vae_state_dict(dict(bundle.vae.state_dict()))
    files["vae"] = os.path.join(out_dir, f"{family}-vae.safetensors")
    comfy.utils.save_torch_file(vae_sd, files["vae"])
    files["all_in_one"] = os.path.join(out_dir, f"{family}-all-in-one.safetensors")
    patcher = comfy_model(unet, sd, torch.float32, scaled=False)
    vae_keys = patcher.model.model_config.process_vae_state_dict_for_saving(vae_sd)  # `vae.*`
    comfy.sd.save_checkpoint(files["all_in_one"], patcher, metadata={"tunegraph_unet_config": json.dumps(unet)},
                             extra_keys=vae_keys)  # fmt: skip
    # ComfyUI's own forward on each fp8 file, on fixed inputs
    g = torch.Generator().manual_seed(0)
    inputs = {
        "x": torch.randn(2, 16, 8, 8, generator=g),
        "sigmas": torch.tensor([0.3, 0.8]),
        "guidance": torch.tensor([1.0, 3.5]),
        "embeds": bundle.encode_prompts(["a red circle", "a blue square"]),
    }
    outputs = {fmt: comfy_forward(files[fmt], bundle, inputs) for fmt in ("fp8_e4m3fn", "fp8_e5m2", SCALED)}
    torch.save({"inputs": inputs, "outputs": outputs}, os.path.join(out_dir, f"{family}-forward.pt"))
    adapters = {
        fmt: adapter_parity(family, files[fmt], fmt != "fp32", inputs, out_dir)
        for fmt in ("fp32", "fp8_e4m3fn", SCALED)
    }
    with open(os.path.join(out_dir, f"{family}-adapters.json"), "w") as f:
        json.dump(adapters, f)
    return files


def write_in_child(out_dir: Path) -> dict:
    """Run this module in a child process (`python -m comfy_fixtures`); {family: {format: path}, "dir": ...}."""
    from comfy_server import COMFY_DIR

    tests = Path(__file__).resolve().parent
    proc = subprocess.run([sys.executable, "-m", "comfy_fixtures", str(COMFY_DIR), str(out_dir), "flux,hidream"],
                          cwd=tests, capture_output=True, text=True, timeout=600)  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"comfy_fixtures failed:\n{proc.stderr[-3000:]}{proc.stdout[-2000:]}")
    files = json.loads(proc.stdout.strip().splitlines()[-1])
    files["dir"] = str(out_dir)
    return files


def main() -> None:
    comfy_dir, out_dir, families = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
    start_comfy(comfy_dir)
    files = {family: write_family(family, out_dir) for family in families}
    print(json.dumps(files))


if __name__ == "__main__":
    main()
