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
`OUT_DIR/<family>-forward.pt` for the tests to compare with our loader's module.
"""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

FORMATS = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp8_e4m3fn": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2"}  # fmt: skip
SCALED = "scaled_fp8"
FP8_MAX = 448.0  # float8_e4m3fn


def start_comfy(comfy_dir: str) -> None:
    sys.path.insert(0, comfy_dir)
    logging.basicConfig(stream=io.StringIO(), level=logging.WARNING, force=True)
    import comfy.options

    comfy.options.enable_args_parsing()
    argv, sys.argv = sys.argv, [sys.argv[0], "--cpu"]
    import comfy.sd  # noqa: F401  (parses --cpu)

    sys.argv = argv


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


def comfy_forward(path: str, bundle, inputs: dict):
    """Load a saved file the ComfyUI way (explicit shape from its metadata) and run it forward."""
    import comfy.model_detection
    import comfy.utils
    import torch
    from safetensors import safe_open

    from tunegraph.nodes.comfy_model import hidream_llama_stack

    with safe_open(path, "pt") as f:
        unet = json.loads(f.metadata()["tunegraph_unet_config"])
    sd = comfy.utils.load_torch_file(path, safe_load=True)
    prefix = comfy.model_detection.unet_prefix_from_state_dict(sd)
    sd = comfy.utils.state_dict_prefix_replace(sd, {prefix: ""}, filter_keys=True)
    scaled = sd.pop("scaled_fp8", None) is not None  # as model_detection.model_config_from_unet
    weight_dtype = comfy.utils.weight_dtype(sd)
    dm = comfy_model(unet, sd, weight_dtype, scaled).model.diffusion_model
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
