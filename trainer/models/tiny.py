"""The `tiny` flavour: small random models built in code, deterministic from a seed.

Each component gets its own seed derived from the user's seed, and is built inside
`torch.random.fork_rng`, so the global RNG state is left alone and changing one component's shape
never changes another's weights. Sizes are chosen so a 64x64 px training step takes well under a
second on a laptop CPU, while every code path (packing, RoPE ids, guidance, pooled text) is real.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from ..training.flow import FLUX_BASE_SEQ_LEN, FLUX_BASE_SHIFT, FLUX_MAX_SEQ_LEN, FLUX_MAX_SHIFT
from .tokenizers import clip_tokenizer, t5_tokenizer

T = TypeVar("T")

TEXT_DIM = 32  # T5 d_model = joint_attention_dim; CLIP hidden = pooled_projection_dim
TEXT_TOKENS = 32  # prompt length of both tiny tokenizers
# Flux.1's VAE latent normalisation, so tiny latents are handled exactly like real ones.
FLUX_VAE_SHIFT, FLUX_VAE_SCALE = 0.1159, 0.3611


def seeded(seed: int, component: int, build: Callable[[], T]) -> T:
    """Run `build` with the CPU RNG seeded from (seed, component), restoring the global RNG after."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 64 + component)
        return build()


def tiny_vae() -> AutoencoderKL:
    """A real 8x AutoencoderKL (4 blocks) with 16 latent channels and Flux's shift/scale."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=FLUX_VAE_SCALE,
        shift_factor=FLUX_VAE_SHIFT,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def tiny_clip(vocab_size: int, bos_id: int, eos_id: int) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_DIM,
        intermediate_size=2 * TEXT_DIM,
        projection_dim=TEXT_DIM,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=TEXT_TOKENS,
        bos_token_id=bos_id,
        eos_token_id=eos_id,  # CLIP pools the hidden state at the first EOS
        pad_token_id=eos_id,
    )
    return CLIPTextModel(config)


def tiny_t5(vocab_size: int, pad_id: int, eos_id: int) -> T5EncoderModel:
    config = T5Config(
        vocab_size=vocab_size,
        d_model=TEXT_DIM,
        d_kv=8,
        d_ff=2 * TEXT_DIM,
        num_layers=1,
        num_heads=4,
        feed_forward_proj="gated-gelu",  # T5 v1.1, as Flux uses
        relative_attention_num_buckets=8,
        relative_attention_max_distance=TEXT_TOKENS,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        decoder_start_token_id=pad_id,
    )
    return T5EncoderModel(config)


def tiny_flux_transformer(guidance_embeds: bool) -> FluxTransformer2DModel:
    """Two heads of 16 (hidden 32); RoPE axes 4+6+6 = head dim. diffusers initialises no layer to
    zero here, so the random model is a non-constant function of its inputs."""
    return FluxTransformer2DModel(
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TEXT_DIM,
        pooled_projection_dim=TEXT_DIM,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),
    )


def flux_scheduler(schnell: bool = False) -> FlowMatchEulerDiscreteScheduler:
    """Flux.1-dev's scheduler config (resolution-dependent shift); schnell's fixed shift 1."""
    if schnell:
        return FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    return FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=FLUX_BASE_SHIFT,
        max_shift=FLUX_MAX_SHIFT,
        base_image_seq_len=FLUX_BASE_SEQ_LEN,
        max_image_seq_len=FLUX_MAX_SEQ_LEN,
    )


def tiny_flux_parts(seed: int, guidance_embeds: bool = True) -> dict[str, Any]:
    """All components of a tiny Flux, keyed like the diffusers pipeline's components."""
    clip_tok, t5_tok = clip_tokenizer(TEXT_TOKENS), t5_tokenizer(TEXT_TOKENS)
    return {
        "transformer": seeded(seed, 0, lambda: tiny_flux_transformer(guidance_embeds)),
        "vae": seeded(seed, 1, tiny_vae),
        "text_encoder": seeded(
            seed, 2, lambda: tiny_clip(len(clip_tok), clip_tok.bos_token_id, clip_tok.eos_token_id)
        ),
        "text_encoder_2": seeded(
            seed, 3, lambda: tiny_t5(len(t5_tok), t5_tok.pad_token_id, t5_tok.eos_token_id)
        ),
        "tokenizer": clip_tok,
        "tokenizer_2": t5_tok,
        "scheduler": flux_scheduler(schnell=not guidance_embeds),
    }
