"""Hand the trainer's Flux components to ComfyUI as MODEL, CONDITIONING and decoded IMAGEs.

ComfyUI's Flux detection assumes the full-size shapes (24 heads), so a tiny or otherwise unusual
transformer cannot go through UNETLoader. Here the shape comes from the diffusers config itself:
the unet config (heads, depth, widths, RoPE axes) is written out explicitly, the weights go through
our diffusers->BFL key mapping (trainer/models/comfy_keys.py, tested equal to ComfyUI's
`convert_diffusers_mmdit`; diffusers' own converter assumes width 3072), and the result is a stock
`model_base.Flux` in a ModelPatcher. Stock KSampler, LoraLoaderModelOnly and ApplyAdapter then work on it as on any Flux.
The weights are copied, so training the trainer's transformer later never changes this MODEL.
HiDream goes the same way: ComfyUI's HiDream module uses diffusers' own key names, and its detection
assumes the full-size shapes too, so the unet config again comes from the diffusers config.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..trainer.errors import ConfigError
from ..trainer.models.comfy_keys import UNET_CONFIG_KEY, to_comfy_keys, unet_config


def comfy_state_dict(transformer: torch.nn.Module, family: str = "flux") -> dict[str, torch.Tensor]:
    """diffusers keys -> ComfyUI keys (trainer/models/comfy_keys.py: BFL layout for Flux, the same
    names for HiDream), on copies of the weights."""
    sd = {k: v.detach().clone() for k, v in transformer.state_dict().items()}
    return to_comfy_keys(family, sd)


def comfy_model_from_state_dict(unet: dict[str, Any], sd: dict[str, torch.Tensor], dtype: torch.dtype):
    """A ModelPatcher around a stock ComfyUI model built from an explicit unet_config (no detection)."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models as supported

    family = unet["image_model"]
    if family == "flux":
        config = (supported.Flux if unet["guidance_embed"] else supported.FluxSchnell)(unet)
    elif family == "hidream":
        config = supported.HiDream(unet)
    else:
        raise ConfigError(f"unet config names image_model '{family}'; only flux and hidream are bridged")
    load_device, offload_device = mm.get_torch_device(), mm.unet_offload_device()
    config.set_inference_dtype(
        dtype, mm.unet_manual_cast(dtype, load_device, config.supported_inference_dtypes)
    )
    model = config.get_model(sd, "").to(offload_device)
    missing, unexpected = model.diffusion_model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ConfigError(
            f"ToComfyModel: weights do not fit (missing {missing[:4]}, unexpected {unexpected[:4]})"
        )
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)


def to_comfy_model(bundle: Any):
    """A ComfyUI ModelPatcher around a stock model_base.Flux / HiDream holding a copy of
    `bundle.transformer`."""
    family = getattr(bundle, "family", "")
    try:
        config = unet_config(family, bundle.transformer)
    except ConfigError as e:
        raise ConfigError(f"ToComfyModel: {e}") from None
    return comfy_model_from_state_dict(config, comfy_state_dict(bundle.transformer, family), bundle.dtype)


def hidream_llama_stack(bundle: Any, llama: torch.Tensor) -> torch.Tensor:
    """Our cached llama embeds [B,n,L,D] (the n distinct layers) -> ComfyUI's [B,max+1,L,D], which it
    indexes by layer number (slots no block reads stay zero)."""
    layers = list(bundle.cached_llama_layers)
    out = llama.new_zeros(llama.shape[0], max(layers) + 1, *llama.shape[2:])
    for i, layer in enumerate(layers):
        out[:, layer] = llama[:, i]
    return out


@torch.no_grad()
def to_conditioning(bundle: Any, prompt: str, guidance: float) -> list:
    """ComfyUI CONDITIONING from the trainer's own text encoders (T5 sequence + pooled CLIP), with
    Flux's distilled guidance value as ComfyUI's FluxGuidance node sets it."""
    embeds = bundle.encode_prompts([prompt])
    if getattr(bundle, "family", "") == "hidream":  # real CFG only: no guidance value
        llama = hidream_llama_stack(bundle, embeds["llama_prompt_embeds"].float().cpu())
        extra = {"pooled_output": embeds["pooled_prompt_embeds"].float().cpu(), "conditioning_llama3": llama}
        return [[embeds["t5_prompt_embeds"].float().cpu(), extra]]
    cond = embeds["prompt_embeds"].float().cpu()
    pooled = embeds["pooled_prompt_embeds"].float().cpu()
    return [[cond, {"pooled_output": pooled, "guidance": float(guidance)}]]


@torch.no_grad()
def decode_comfy_latents(bundle: Any, samples: torch.Tensor) -> torch.Tensor:
    """KSampler's LATENT (raw VAE space: ComfyUI undoes Flux's shift/scale) -> IMAGE [B,H,W,3]."""
    config = bundle.vae.config
    normalised = (samples.float() - (config.shift_factor or 0.0)) * config.scaling_factor
    pixels = bundle.decode_latents(normalised.to(bundle.device, bundle.dtype))
    return ((pixels.float() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).cpu()


def load_comfy_unet(path: str | Path, dtype: torch.dtype = torch.float32):
    """A ModelPatcher from a diffusion-model file written by `tunegraph tiny-models --comfyui`: ComfyUI
    keys, with the unet config (the explicit shape) in the file's metadata."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        sd = {k: f.get_tensor(k).to(dtype) for k in f.keys()}
    if UNET_CONFIG_KEY not in meta:
        raise ConfigError(
            f"{Path(path).name} carries no '{UNET_CONFIG_KEY}' metadata (not written by `tunegraph "
            "tiny-models --comfyui`); load a full-size model with ComfyUI's own Load Diffusion Model"
        )
    return comfy_model_from_state_dict(json.loads(meta[UNET_CONFIG_KEY]), sd, dtype)
