"""The value lists config keys accept, each in one place. They live here, free of torch, so that
config.py (and the key table) import without it; the modules that implement them import them from
here: quantize.py (PRECISIONS), training/optim.py (LR_SCHEDULERS, CLIP_METHODS), training/flow.py
(LOSS_TYPES, HUBER_SCHEDULES), data/backends.py (CAPTION_STRATEGIES, RESOLUTION_TYPES),
plan/presets.py (MEMORY_PRESETS), plan/offload.py (GROUP_OFFLOAD_TYPES), adapters/targets.py and
models/flux.py (FLUX_LORA_TARGET_PRESETS)."""

from __future__ import annotations

# model_type, model_family (models/registry.py FAMILIES has one entry per name; a test holds them
# equal), lora_type (adapters/__init__.py `attach_adapter`).
MODEL_TYPES = ("lora",)
MODEL_FAMILIES = ("flux", "hidream")
LORA_TYPES = ("standard", "lycoris")
# lora_init_type: SimpleTuner's names; adapters/lora.py implements default and gaussian and says so
# for the others.
LORA_INIT_TYPES = ("default", "gaussian", "loftq", "olora", "pissa")

# mixed_precision (models/prepare.py: fp16 is refused there with what to use instead) and
# base_model_default_dtype (quantize.py: the compute dtype under a quantised base).
MIXED_PRECISIONS = ("bf16", "no", "fp16")
BASE_DEFAULT_DTYPES = ("bf16", "fp32")
# quantize_via (quantize.py, plan/placement.py): where the base is quantised.
QUANTIZE_VIA = ("cpu", "accelerator")

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
# base_model_precision alone may also be fp8-file: train on an fp8 ComfyUI file's own weights
# (models/fp8_base.py).
BASE_PRECISIONS = (*PRECISIONS, "fp8-file")

# lr_scheduler (training/optim.py `schedule_factor`).
LR_SCHEDULERS = ("constant", "constant_with_warmup", "cosine", "polynomial")

# grad_clip_method (training/optim.py `clip_gradients`).
CLIP_METHODS = ("value", "norm")

# loss_type and huber_schedule: SimpleTuner's for flow-matching models (training/flow.py `flow_loss`).
LOSS_TYPES = ("l2", "huber", "smooth_l1")
HUBER_SCHEDULES = ("snr", "exponential", "constant")

# multidatabackend.json caption_strategy and resolution_type (data/backends.py, data/buckets.py).
CAPTION_STRATEGIES = ("filename", "textfile", "instanceprompt")
RESOLUTION_TYPES = ("pixel_area", "area", "pixel")

# memory_preset: card sizes in GB (plan/presets.py picks settings for each).
MEMORY_PRESETS = ("12", "16", "24", "48", "80")

# group_offload_type (plan/offload.py, diffusers' apply_group_offloading).
GROUP_OFFLOAD_TYPES = ("block_level", "leaf_level")

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
