"""diffusers -> ComfyUI weight layouts, without importing ComfyUI, for any transformer width.

Flux: ComfyUI keeps the original BFL layout (fused q/k/v, single blocks' q/k/v/MLP fused into
`linear1`, shift/scale swapped in the final norm). diffusers' own converter hard-codes the full-size
width (3072), so tiny or otherwise unusual shapes need this mapping; tests check it equals ComfyUI's
`convert_diffusers_mmdit` key for key. HiDream: ComfyUI ported diffusers' module, the names are the same.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ConfigError

# safetensors metadata key holding the JSON unet config of a ComfyUI-keyed diffusion-model file
UNET_CONFIG_KEY = "tunegraph_unet_config"

_DOUBLE = {
    "norm1.linear": "img_mod.lin",
    "norm1_context.linear": "txt_mod.lin",
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "ff.net.0.proj": "img_mlp.0",
    "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0",
    "ff_context.net.2": "txt_mlp.2",
}
_DOUBLE_NORMS = {
    "attn.norm_q.weight": "img_attn.norm.query_norm.scale",
    "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
    "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale",
    "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale",
}
_DOUBLE_FUSED = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
_SINGLE = {"norm.linear": "modulation.lin", "proj_out": "linear2"}
_SINGLE_NORMS = {"attn.norm_q.weight": "norm.query_norm.scale", "attn.norm_k.weight": "norm.key_norm.scale"}
_SINGLE_FUSED = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}
_TOP = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "proj_out": "final_layer.linear",
}


def _count(sd: dict[str, torch.Tensor], prefix: str) -> int:
    return len({k[len(prefix) :].split(".", 1)[0] for k in sd if k.startswith(prefix)})


def _linear(sd, out, src: str, dst: str) -> None:
    for part in ("weight", "bias"):
        if f"{src}.{part}" in sd:
            out[f"{dst}.{part}"] = sd.pop(f"{src}.{part}")


def _fused(sd, out, srcs: tuple[str, ...], dst: str) -> None:
    for part in ("weight", "bias"):
        if all(f"{s}.{part}" in sd for s in srcs):
            out[f"{dst}.{part}"] = torch.cat([sd.pop(f"{s}.{part}") for s in srcs], dim=0)


def flux_to_comfy(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers FluxTransformer2DModel state dict -> ComfyUI's Flux (BFL) keys. Every key must map."""
    sd, out = dict(state_dict), {}
    for i in range(_count(sd, "transformer_blocks.")):
        src, dst = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for a, b in _DOUBLE.items():
            _linear(sd, out, src + a, dst + b)
        for a, b in _DOUBLE_NORMS.items():
            if src + a in sd:
                out[dst + b] = sd.pop(src + a)
        for b, parts in _DOUBLE_FUSED.items():
            _fused(sd, out, tuple(src + p for p in parts), dst + b)
    for i in range(_count(sd, "single_transformer_blocks.")):
        src, dst = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for a, b in _SINGLE.items():
            _linear(sd, out, src + a, dst + b)
        for a, b in _SINGLE_NORMS.items():
            if src + a in sd:
                out[dst + b] = sd.pop(src + a)
        for b, parts in _SINGLE_FUSED.items():
            _fused(sd, out, tuple(src + p for p in parts), dst + b)
    for a, b in _TOP.items():
        _linear(sd, out, a, b)
    for part in ("weight", "bias"):  # diffusers' AdaLayerNormContinuous is (scale, shift); BFL (shift, scale)
        key = f"norm_out.linear.{part}"
        if key in sd:
            scale, shift = sd.pop(key).chunk(2, dim=0)
            out[f"final_layer.adaLN_modulation.1.{part}"] = torch.cat([shift, scale], dim=0)
    if sd:
        raise ConfigError(f"Flux -> ComfyUI: no mapping for {len(sd)} key(s), e.g. {sorted(sd)[:4]}")
    return out


def to_comfy_keys(family: str, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if family == "flux":
        return flux_to_comfy(state_dict)
    if family == "hidream":
        return dict(state_dict)
    raise ConfigError(f"no ComfyUI key mapping for model family '{family}' (flux, hidream)")


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


HIDREAM_KEYS = ("patch_size", "in_channels", "out_channels", "num_layers", "num_single_layers",
                "attention_head_dim", "num_attention_heads", "caption_channels", "text_emb_dim",
                "num_routed_experts", "num_activated_experts", "axes_dims_rope", "max_resolution",
                "llama_layers")  # fmt: skip


def hidream_unet_config(transformer: torch.nn.Module) -> dict[str, Any]:
    """ComfyUI's HiDream unet_config: its constructor takes diffusers' config names one to one."""
    c = transformer.config
    out: dict[str, Any] = {"image_model": "hidream"}
    for key in HIDREAM_KEYS:
        value = c[key]
        out[key] = list(value) if isinstance(value, (list, tuple)) else value
    return out


def unet_config(family: str, transformer: torch.nn.Module) -> dict[str, Any]:
    if family == "flux":
        return flux_unet_config(transformer)
    if family == "hidream":
        return hidream_unet_config(transformer)
    raise ConfigError(f"family '{family}' has no ComfyUI model bridge (flux, hidream)")


# -- ComfyUI (BFL) -> diffusers, the inverse of `flux_to_comfy`, from the same tables ---------------

# One diffusers tensor: read ComfyUI tensor `src`, take rows [start:stop) (None: all), and for the
# final norm swap its two halves back (BFL shift, scale -> diffusers scale, shift).
FluxSource = tuple[str, int | None, int | None, bool]


def _blocks(names: list[str], prefix: str) -> list[int]:
    return sorted({int(n[len(prefix) :].split(".", 1)[0]) for n in names if n.startswith(prefix)})


def flux_from_comfy_plan(names: list[str], hidden: int) -> dict[str, FluxSource]:
    """Where each diffusers FluxTransformer2DModel tensor comes from in a ComfyUI (BFL) Flux file with
    hidden size `hidden`. A ComfyUI name nothing maps to is an error (another family, or a LoRA)."""
    have, plan = set(names), {}

    def take(
        src: str, dst: str, start: int | None = None, stop: int | None = None, swap: bool = False
    ) -> None:
        if src in have:
            plan[dst] = (src, start, stop, swap)

    for i in _blocks(names, "double_blocks."):
        src, dst = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        for part in ("weight", "bias"):
            for a, b in _DOUBLE.items():
                take(f"{src}{b}.{part}", f"{dst}{a}.{part}")
            for b, parts in _DOUBLE_FUSED.items():
                for j, p in enumerate(parts):
                    take(f"{src}{b}.{part}", f"{dst}{p}.{part}", j * hidden, (j + 1) * hidden)
        for a, b in _DOUBLE_NORMS.items():
            take(src + b, dst + a)
    for i in _blocks(names, "single_blocks."):
        src, dst = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        for part in ("weight", "bias"):
            for a, b in _SINGLE.items():
                take(f"{src}{b}.{part}", f"{dst}{a}.{part}")
            q, k, v, mlp = _SINGLE_FUSED["linear1"]
            for j, p in enumerate((q, k, v)):
                take(f"{src}linear1.{part}", f"{dst}{p}.{part}", j * hidden, (j + 1) * hidden)
            take(f"{src}linear1.{part}", f"{dst}{mlp}.{part}", 3 * hidden, None)
        for a, b in _SINGLE_NORMS.items():
            take(src + b, dst + a)
    for part in ("weight", "bias"):
        for a, b in _TOP.items():
            take(f"{b}.{part}", f"{a}.{part}")
        take(f"final_layer.adaLN_modulation.1.{part}", f"norm_out.linear.{part}", swap=True)
    unused = sorted(have - {src for src, *_ in plan.values()})
    if unused:
        raise ConfigError(f"{len(unused)} tensor(s) are not Flux (BFL) weights, e.g. {', '.join(unused[:4])}")
    return plan


def flux_source_tensor(read: Any, src: str, start: int | None, stop: int | None, swap: bool) -> torch.Tensor:
    """One diffusers tensor from ComfyUI tensor `src`: `read(src, rows)` reads it whole (rows None)
    or only rows [start, stop), so a fused q/k/v weight is never held whole beside its parts."""
    if swap:
        shift, scale = read(src, None).chunk(2, dim=0)
        return torch.cat([scale, shift], dim=0)
    return read(src, None if start is None else (start, stop))
