"""A tiny diffusers Flux transformer and fixed inputs, shared by the adapter and node unit tests."""

from __future__ import annotations

import torch
from diffusers import FluxTransformer2DModel


def tiny_flux() -> FluxTransformer2DModel:
    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6),
        guidance_embeds=True,
    ).eval()  # fmt: skip


def flux_inputs(seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(1, 16, 64, generator=g),
        "encoder_hidden_states": torch.randn(1, 8, 32, generator=g),
        "pooled_projections": torch.randn(1, 32, generator=g),
        "timestep": torch.tensor([0.5]),
        "img_ids": torch.zeros(16, 3),
        "txt_ids": torch.zeros(8, 3),
        "guidance": torch.tensor([1.0]),
    }


def run(model) -> torch.Tensor:
    """The model's output on `flux_inputs()`, without gradients."""
    with torch.no_grad():
        return model(**flux_inputs(), return_dict=False)[0]
