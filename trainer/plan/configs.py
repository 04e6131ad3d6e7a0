"""Full-size transformer configs (the published diffusers `transformer/config.json` values), so a
plan needs no model files: the fake-tensor forward builds the model from these."""

from __future__ import annotations

from typing import Any

FLUX_DEV: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}
FLUX_SCHNELL: dict[str, Any] = {**FLUX_DEV, "guidance_embeds": False}

HIDREAM_I1: dict[str, Any] = {
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 16,
    "num_single_layers": 32,
    "attention_head_dim": 128,
    "num_attention_heads": 20,
    "caption_channels": [4096, 4096],
    "text_emb_dim": 2048,
    "num_routed_experts": 4,
    "num_activated_experts": 2,
    "axes_dims_rope": (64, 32, 32),
    "max_resolution": (128, 128),
    "llama_layers": list(range(32)) + [31] * 16,
}


def full_size_config(family: str, flavour: str) -> dict[str, Any]:
    if family == "flux":
        return FLUX_SCHNELL if flavour == "schnell" else FLUX_DEV
    return HIDREAM_I1


def text_tokens(family: str, flavour: str) -> int:
    """The cached prompt length the transformer sees (models/flux.py, models/hidream.py)."""
    if family == "flux":
        return 256 if flavour == "schnell" else 512
    return 128
