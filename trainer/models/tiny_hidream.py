"""The `tiny` HiDream flavour: small random components with the real classes, built in code.

Dimensions are all different on purpose (CLIP-L 16 + CLIP-G 24 pooled = 40, T5 32, Llama 48), so a
mixed-up text stream fails loudly instead of silently fitting. The Llama has 3 layers and the
transformer reads `llama_layers = [1, 2, 2]`, so layer 0 is never read (it is not cached) and one
layer feeds two blocks, like the real model's `[0..31, 31, 31, ...]`.
"""

from __future__ import annotations

from typing import Any

from diffusers import FlowMatchEulerDiscreteScheduler, HiDreamImageTransformer2DModel
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from .tiny import seeded, tiny_t5, tiny_vae
from .tokenizers import clip_tokenizer, t5_tokenizer

TEXT_TOKENS = 32  # prompt length of every tiny tokenizer (the real model uses 128)
CLIP_L_DIM, CLIP_G_DIM, T5_DIM, LLAMA_DIM = 16, 24, 32, 48
LLAMA_LAYERS = [1, 2, 2]  # one entry per double + single block
LLAMA_BOS, LLAMA_EOS = "<|begin_of_text|>", "<|end_of_text|>"


def llama_tokenizer(max_length: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE without merges (one token per byte) that prepends BOS, as Llama 3's does."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {LLAMA_BOS: 0, LLAMA_EOS: 1, **{s: i + 2 for i, s in enumerate(alphabet)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{LLAMA_BOS} $A", pair=f"{LLAMA_BOS} $A {LLAMA_BOS} $B", special_tokens=[(LLAMA_BOS, 0)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=LLAMA_BOS,
        eos_token=LLAMA_EOS,
        pad_token=LLAMA_EOS,  # HiDreamImagePipeline pads Llama prompts with EOS
        model_max_length=max_length,
    )


def tiny_clip_projection(vocab_size: int, bos_id: int, eos_id: int, dim: int) -> CLIPTextModelWithProjection:
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=dim,
        intermediate_size=2 * dim,
        projection_dim=dim,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=TEXT_TOKENS,
        bos_token_id=bos_id,
        eos_token_id=eos_id,  # pooled at the first EOS
        pad_token_id=eos_id,
    )
    return CLIPTextModelWithProjection(config)


def tiny_llama(vocab_size: int, bos_id: int, eos_id: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=LLAMA_DIM,
        intermediate_size=2 * LLAMA_DIM,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=TEXT_TOKENS,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def tiny_hidream_transformer(max_resolution: tuple[int, int] = (128, 128)) -> HiDreamImageTransformer2DModel:
    """1 double + 2 single blocks, 2 heads of 16 (RoPE axes 4+6+6), 4 routed experts, top 2.
    `max_resolution` (latent pixels) bounds non-square inputs: 128x128 -> 4096 tokens (1024 px area),
    the real model's limit, so the tiny flavour accepts every size the real one does."""
    return HiDreamImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        caption_channels=[T5_DIM, LLAMA_DIM],
        text_emb_dim=CLIP_L_DIM + CLIP_G_DIM,
        num_routed_experts=4,
        num_activated_experts=2,
        axes_dims_rope=(4, 6, 6),
        max_resolution=max_resolution,
        llama_layers=list(LLAMA_LAYERS),
    )


def hidream_scheduler(shift: float) -> FlowMatchEulerDiscreteScheduler:
    """Flow-matching Euler with a fixed shift (HiDream has no resolution-dependent shift)."""
    return FlowMatchEulerDiscreteScheduler(shift=shift, use_dynamic_shifting=False)


def tiny_hidream_parts(seed: int, shift: float = 3.0) -> dict[str, Any]:
    """All components of a tiny HiDream, keyed like HiDreamImagePipeline's components."""
    clip_tok, clip_g_tok = clip_tokenizer(TEXT_TOKENS), clip_tokenizer(TEXT_TOKENS)
    t5_tok, llama_tok = t5_tokenizer(TEXT_TOKENS), llama_tokenizer(TEXT_TOKENS)
    special = (clip_tok.bos_token_id, clip_tok.eos_token_id)
    return {
        "transformer": seeded(seed, 10, tiny_hidream_transformer),
        "vae": seeded(seed, 11, tiny_vae),
        "text_encoder": seeded(seed, 12, lambda: tiny_clip_projection(len(clip_tok), *special, CLIP_L_DIM)),
        "text_encoder_2": seeded(
            seed, 13, lambda: tiny_clip_projection(len(clip_g_tok), *special, CLIP_G_DIM)
        ),
        "text_encoder_3": seeded(
            seed, 14, lambda: tiny_t5(len(t5_tok), t5_tok.pad_token_id, t5_tok.eos_token_id)
        ),
        "text_encoder_4": seeded(
            seed, 15, lambda: tiny_llama(len(llama_tok), llama_tok.bos_token_id, llama_tok.eos_token_id)
        ),
        "tokenizer": clip_tok,
        "tokenizer_2": clip_g_tok,
        "tokenizer_3": t5_tok,
        "tokenizer_4": llama_tok,
        "scheduler": hidream_scheduler(shift),
    }
