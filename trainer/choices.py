"""The value lists config keys accept, each in one place. They live here, free of torch, so that
config.py (and the key table) import without it; the modules that implement them import them from
here: quantize.py (PRECISIONS), training/optim.py (LR_SCHEDULERS), adapters/targets.py and
models/flux.py (FLUX_LORA_TARGET_PRESETS)."""

from __future__ import annotations

# base_model_precision / text_encoder_N_precision (quantize.py implements them).
PRECISIONS = (
    "no_change",
    "int8-quanto",
    "int4-quanto",
    "int2-quanto",
    "fp8-quanto",
    "nf4-bnb",
    "int8-torchao",
    "fp8-torchao",
)

# lr_scheduler (training/optim.py `schedule_factor`).
LR_SCHEDULERS = ("constant", "constant_with_warmup", "cosine", "polynomial")

# flux_lora_target: SimpleTuner's meanings, as diffusers module-name suffixes (PEFT matches suffixes).
_FLUX_ATTN = ["to_k", "to_q", "to_v", "add_k_proj", "add_q_proj", "add_v_proj", "to_out.0", "to_add_out"]
_FLUX_CONTEXT = ["add_k_proj", "add_q_proj", "add_v_proj", "to_add_out"]
_FLUX_CONTEXT_FFS = ["ff_context.net.0.proj", "ff_context.net.2"]
_FLUX_FFS = ["ff.net.0.proj", "ff.net.2", *_FLUX_CONTEXT_FFS, "proj_mlp", "proj_out"]
FLUX_LORA_TARGET_PRESETS: dict[str, list[str]] = {
    "mmdit": ["to_k", "to_q", "to_v", "to_out.0"],  # image-stream attention; SimpleTuner's default list
    "all": _FLUX_ATTN,  # both streams' attention
    "all+ffs": _FLUX_ATTN + _FLUX_FFS,  # plus every feed-forward and single-block MLP/out
    "context": _FLUX_CONTEXT,  # text-stream attention only
    "context+ffs": _FLUX_CONTEXT + _FLUX_CONTEXT_FFS,
    # TheLastBen's small LoRAs: two / one single-block output projections (full-size Flux).
    "tiny": ["single_transformer_blocks.7.proj_out", "single_transformer_blocks.20.proj_out"],
    "nano": ["single_transformer_blocks.7.proj_out"],
}
