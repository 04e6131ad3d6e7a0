"""Hand the trainer's Flux components to ComfyUI as MODEL, CONDITIONING and decoded IMAGEs.

ComfyUI's Flux detection assumes the full-size shapes (24 heads), so a tiny or otherwise unusual
transformer cannot go through UNETLoader. Here the shape comes from the diffusers config itself:
the unet config (heads, depth, widths, RoPE axes) is written out explicitly, the weights go through
ComfyUI's own diffusers->BFL converter (`convert_diffusers_mmdit`, which reads the hidden size from
the tensors rather than assuming 3072), and the result is a stock `model_base.Flux` in a
ModelPatcher. Stock KSampler, LoraLoaderModelOnly and ApplyAdapter then work on it as on any Flux.
The weights are copied, so training the trainer's transformer later never changes this MODEL.
"""

from __future__ import annotations

from typing import Any

import torch

from ..trainer.errors import ConfigError


def flux_unet_config(transformer: torch.nn.Module) -> dict[str, Any]:
    """ComfyUI's Flux unet_config for a diffusers FluxTransformer2DModel, from its own config."""
    c = transformer.config
    hidden = c.num_attention_heads * c.attention_head_dim
    patch = 2  # diffusers' Flux packs 2x2 latent patches into in_channels = 4 * latent channels
    return {
        "image_model": "flux",
        "in_channels": c.in_channels // (patch * patch),
        "out_channels": (c.out_channels or c.in_channels) // (patch * patch),
        "vec_in_dim": c.pooled_projection_dim,
        "context_in_dim": c.joint_attention_dim,
        "hidden_size": hidden,
        "mlp_ratio": 4.0,
        "num_heads": c.num_attention_heads,
        "depth": c.num_layers,
        "depth_single_blocks": c.num_single_layers,
        "axes_dim": list(c.axes_dims_rope),
        "theta": 10000,
        "patch_size": patch,
        "qkv_bias": True,
        "guidance_embed": bool(c.guidance_embeds),
    }


def comfy_state_dict(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """diffusers Flux keys -> ComfyUI (BFL) keys; q/k/v (and single-block MLP) fused as ComfyUI wants."""
    import comfy.model_detection

    sd = {k: v.detach().clone() for k, v in transformer.state_dict().items()}
    out = comfy.model_detection.convert_diffusers_mmdit(sd, "")
    if out is None:
        raise ConfigError("ToComfyModel: the transformer's weights are not a diffusers Flux layout")
    return out


def to_comfy_model(bundle: Any):
    """A ComfyUI ModelPatcher around a stock model_base.Flux holding a copy of `bundle.transformer`."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models as supported

    if getattr(bundle, "family", "") != "flux":
        raise ConfigError(
            f"ToComfyModel: family '{bundle.family}' has no ComfyUI model bridge yet (flux only)"
        )
    unet_config = flux_unet_config(bundle.transformer)
    config = (supported.Flux if unet_config["guidance_embed"] else supported.FluxSchnell)(unet_config)
    load_device, offload_device = mm.get_torch_device(), mm.unet_offload_device()
    dtype = bundle.dtype
    config.set_inference_dtype(
        dtype, mm.unet_manual_cast(dtype, load_device, config.supported_inference_dtypes)
    )
    sd = comfy_state_dict(bundle.transformer)
    model = config.get_model(sd, "").to(offload_device)
    missing, unexpected = model.diffusion_model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ConfigError(
            f"ToComfyModel: weights do not fit (missing {missing[:4]}, unexpected {unexpected[:4]})"
        )
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)


@torch.no_grad()
def to_conditioning(bundle: Any, prompt: str, guidance: float) -> list:
    """ComfyUI CONDITIONING from the trainer's own text encoders (T5 sequence + pooled CLIP), with
    Flux's distilled guidance value as ComfyUI's FluxGuidance node sets it."""
    embeds = bundle.encode_prompts([prompt])
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
