"""The SimpleTuner config keys TuneGraph reads, with their types and defaults.

`KEYS` are implemented. Every other key of SimpleTuner's option list (simpletuner_options.json) is
accepted: `IGNORED` ones quietly (they cannot change a local run), `UNSUPPORTED` ones with one warning
naming those set to anything but SimpleTuner's default. Keys SimpleTuner does not have are errors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .choices import (  # issue 14: one place each
    BASE_DEFAULT_DTYPES,
    BASE_PRECISIONS,
    CAPTION_STRATEGIES,
    CLIP_METHODS,
    FLUX_LORA_TARGET_PRESETS,
    GROUP_OFFLOAD_TYPES,
    HUBER_SCHEDULES,
    LORA_INIT_TYPES,
    LORA_TYPES,
    LOSS_TYPES,
    LR_SCHEDULERS,
    MEMORY_PRESETS,
    MIXED_PRECISIONS,
    MODEL_FAMILIES,
    MODEL_TYPES,
    PRECISIONS,
    QUANTIZE_VIA,
    RESOLUTION_TYPES,
)
from .simpletuner_options import CONFIG_DEFAULTS, CONFIG_NO_EFFECT, CONFIG_SPEED_MEMORY, FLOW_MATCHING_NOOPS


@dataclass(frozen=True)
class Key:
    kind: str  # str | int | float | bool | path | any
    default: Any = None
    optional: bool = True  # None allowed
    choices: tuple[str, ...] = ()
    # issue 18: ranges (numbers are always finite; NaN / Inf are refused for every numeric key)
    minimum: float | None = None
    maximum: float | None = None
    above: bool = False  # the minimum itself is excluded (value > minimum)


def _k(kind: str, default: Any = None, *choices: str, **limits: Any) -> Key:
    return Key(kind, default, True, tuple(choices), **limits)


# issue 18: the ranges keys are annotated with
POSITIVE = {"minimum": 0, "above": True}
AT_LEAST_0 = {"minimum": 0}
AT_LEAST_1 = {"minimum": 1}
FRACTION = {"minimum": 0, "maximum": 1}
SEED = {"minimum": 0, "maximum": 2**63 - 1}


KEYS: dict[str, Key] = {
    # model
    "model_type": _k("str", "lora", *MODEL_TYPES),
    "model_family": _k("str", "flux", *MODEL_FAMILIES),
    "model_flavour": _k("str", None),
    "pretrained_model_name_or_path": _k("str", None),
    "pretrained_vae_model_name_or_path": _k("str", None),
    "pretrained_transformer_model_name_or_path": _k("str", None),
    "pretrained_transformer_subfolder": _k("str", "transformer"),
    # TuneGraph's own: the tiny flavour's random weights (fixed, like a checkpoint; not the training seed)
    "tiny_model_seed": _k("int", 0, **SEED),
    # adapter
    "lora_type": _k("str", "standard", *LORA_TYPES),
    "lycoris_config": _k("path", None),
    "lora_rank": _k("int", 16, **AT_LEAST_1),
    "lora_alpha": _k("float", None, **POSITIVE),
    "lora_dropout": _k("float", 0.0, **FRACTION),
    "flux_lora_target": _k("str", "all", *FLUX_LORA_TARGET_PRESETS),
    "lora_init_type": _k("str", "default", *LORA_INIT_TYPES),
    "init_lokr_norm": _k("float", None, **AT_LEAST_0),
    # data
    "data_backend_config": _k("path", None),
    "resolution": _k("float", 1024, **{**POSITIVE, "maximum": 16384}),
    "resolution_type": _k("str", "pixel_area", *RESOLUTION_TYPES),
    "minimum_image_size": _k("float", None, **AT_LEAST_0),
    "maximum_image_size": _k("float", None, **AT_LEAST_0),
    "target_downsample_size": _k("float", None, **AT_LEAST_0),
    "aspect_bucket_rounding": _k("int", 2, **{"minimum": 0, "maximum": 8}),
    "caption_strategy": _k("str", "filename", *CAPTION_STRATEGIES),
    "instance_prompt": _k("str", None),
    "caption_dropout_probability": _k("float", 0.0, **FRACTION),
    "vae_batch_size": _k("int", 4, **AT_LEAST_1),
    "write_batch_size": _k("int", 128, **AT_LEAST_1),
    "cache_dir": _k("str", None),
    "cache_dir_text": _k("str", None),
    "cache_dir_vae": _k("str", None),
    # loop
    "output_dir": _k("str", "output/models"),
    "seed": _k("int", 42, **SEED),
    "train_batch_size": _k("int", 1, **AT_LEAST_1),
    "gradient_accumulation_steps": _k("int", 1, **AT_LEAST_1),
    "max_train_steps": _k("int", None, **AT_LEAST_0),
    "num_train_epochs": _k("int", 1, **AT_LEAST_0),
    "learning_rate": _k("float", 1e-4, **POSITIVE),
    "optimizer": _k("str", "adamw_bf16"),
    "optimizer_config": _k("str", None),
    "adam_beta1": _k("float", 0.9, **FRACTION),
    "adam_beta2": _k("float", 0.999, **FRACTION),
    "adam_weight_decay": _k("float", 1e-2, **AT_LEAST_0),
    "adam_epsilon": _k("float", 1e-8, **AT_LEAST_0),
    "prodigy_d_coef": _k("float", 1.0, **POSITIVE),
    "lr_scheduler": _k("str", "constant", *LR_SCHEDULERS),
    "lr_warmup_steps": _k("int", 0, **AT_LEAST_0),
    "lr_end": _k("float", 4e-7, **AT_LEAST_0),
    "lr_power": _k("float", 1.0, **POSITIVE),
    "max_grad_norm": _k("float", 2.0, **AT_LEAST_0),
    "grad_clip_method": _k("str", "value", *CLIP_METHODS),
    "mixed_precision": _k("str", "bf16", *MIXED_PRECISIONS),
    "gradient_checkpointing": _k("bool", False),
    "gradient_checkpointing_interval": _k("int", None, **AT_LEAST_1),
    "use_ema": _k("bool", False),
    "ema_decay": _k("float", 0.995, **FRACTION),
    # flow matching
    "flow_schedule_shift": _k("float", None, **AT_LEAST_0),  # 0: the family default
    "flow_schedule_auto_shift": _k("bool", False),
    "flow_use_uniform_schedule": _k("bool", False),
    "flow_sigmoid_scale": _k("float", 1.0, **POSITIVE),
    "flux_guidance_value": _k("float", 1.0, **AT_LEAST_0),
    # checkpoints
    "checkpoint_step_interval": _k("int", None, **AT_LEAST_0),
    "checkpointing_steps": _k("int", None, **AT_LEAST_0),
    "checkpoints_total_limit": _k("int", None, **AT_LEAST_0),
    "resume_from_checkpoint": _k("str", None),
    # validation
    "validation_prompt": _k("str", None),
    "validation_negative_prompt": _k("str", "blurry, cropped, ugly"),
    "user_prompt_library": _k("path", None),
    "validation_step_interval": _k("int", None, **AT_LEAST_1),
    "validation_steps": _k("int", None, **AT_LEAST_1),
    "validation_seed": _k("int", None, **SEED),
    "validation_resolution": _k("str", "1024"),
    "validation_num_inference_steps": _k("int", 30, **AT_LEAST_1),
    "validation_guidance": _k("float", 3.0, **AT_LEAST_0),
    "validation_guidance_real": _k("float", 1.0, **AT_LEAST_0),
    "validation_no_cfg_until_timestep": _k("int", 2, **AT_LEAST_0),
    # TuneGraph's own: AdaptiveGuider's switch-off (cosine similarity of cond/uncond); 1.0 = plain CFG
    "validation_adaptive_cfg_threshold": _k("float", 1.0, **{"minimum": -1, "maximum": 1}),
    "disable_validation": _k("bool", False),
    "eval_steps_interval": _k("int", None, **AT_LEAST_0),
    "num_eval_images": _k("int", 4, **AT_LEAST_1),
    "eval_timesteps": _k("int", 28, **AT_LEAST_1),
    # logging
    "report_to": _k("str", None),
    "tracker_run_name": _k("str", "tunegraph"),
    "tracker_project_name": _k("str", None),
    "logging_dir": _k("str", None),
    # precision: quantised base and text encoders (trainer/quantize.py); bf16|fp32 for what stays unquantised
    # issue 13: fp8-file trains on an fp8 / scaled-fp8 ComfyUI file's own float8 weights
    "base_model_precision": _k("str", "no_change", *BASE_PRECISIONS),
    "base_model_default_dtype": _k("str", "bf16", *BASE_DEFAULT_DTYPES),
    **{f"text_encoder_{i}_precision": _k("str", "no_change", *PRECISIONS) for i in range(1, 5)},
    "quantize_via": _k("str", None, *QUANTIZE_VIA),
    # issue 13: text-encoder files (family order: Flux CLIP-L, T5; HiDream CLIP-L, CLIP-G, T5, Llama) and
    # the ComfyUI install their tokenizers come from (default: the running ComfyUI, else $COMFYUI_DIR)
    **{f"text_encoder_{i}_path": _k("str", None) for i in range(1, 5)},
    "comfyui_path": _k("str", None),
    # issue 13/14: memory by phase (training/phases.py)
    "offload_during_startup": _k("bool", False),
    "keep_vae_loaded": _k("bool", False),
    "vae_cache_ondemand": _k("bool", False),  # issue 15: latents encoded when drawn (cache/ondemand.py)
    "vae_cache_disable": _k("bool", False),  # on demand and never written (cache/ondemand.py)
    # hidream
    "hidream_use_load_balancing_loss": _k("bool", False),
    "hidream_load_balancing_loss_weight": _k("float", 0.01, **AT_LEAST_0),
    # issue 15: SimpleTuner's loss options (training/flow.py `flow_loss`)
    "loss_type": _k("str", "l2", *LOSS_TYPES),
    "huber_schedule": _k("str", "snr", *HUBER_SCHEDULES),
    "huber_c": _k("float", 0.1, **POSITIVE),
    # issue 15: keep buckets smaller than one batch, filling their batch with their own images (sampler.py)
    "disable_bucket_pruning": _k("bool", False),
    # issue 16: memory plan, presets by card size, group offload of the frozen transformer (trainer/plan/)
    "gpu_memory": _k("float", None),  # GiB the plan checks against (default: the CUDA device's own)
    "memory_preset": _k("str", None, *MEMORY_PRESETS),
    "ignore_memory_plan": _k("bool", False),  # train even when the plan says it will not fit
    "enable_group_offload": _k("bool", False),
    "group_offload_type": _k("str", "block_level", *GROUP_OFFLOAD_TYPES),
    "group_offload_blocks_per_group": _k("int", 1),
    "group_offload_use_stream": _k("bool", False),
    "group_offload_to_disk_path": _k("str", None),
}

# issue 15: every other real SimpleTuner key is accepted, from SimpleTuner's own option list
# (trainer/simpletuner_options.json). Value = SimpleTuner's default, the value that is a no-op here.
# KEYS that are TuneGraph's own, not SimpleTuner's (tests check every other KEYS entry is in the list).
OWN_KEYS = frozenset(
    {"tiny_model_seed", "validation_adaptive_cfg_threshold", "prodigy_d_coef", "disable_validation"}
    | {"gpu_memory", "memory_preset", "ignore_memory_plan"}  # issue 16
    | {f"text_encoder_{i}_path" for i in range(1, 5)}
    | {"comfyui_path"}  # issue 13: ComfyUI files
)
# Accepted quietly: cannot change a local run (hub upload, webhooks, trackers, launcher, logging).
IGNORED: frozenset[str] = frozenset(CONFIG_NO_EFFECT - set(KEYS))
UNSUPPORTED: dict[str, Any] = {
    name: default for name, default in CONFIG_DEFAULTS.items() if name not in KEYS and name not in IGNORED
}
# Accepted and named in the warning's own sentence: memory/speed only, or skipped for flow matching.
SPEED_MEMORY: frozenset[str] = frozenset(CONFIG_SPEED_MEMORY - set(KEYS))
FLOW_NOOPS: frozenset[str] = frozenset(FLOW_MATCHING_NOOPS - set(KEYS))

ALIASES = {"checkpointing_steps": "checkpoint_step_interval", "validation_steps": "validation_step_interval"}

# Implemented keys whose non-default values are not acted on yet (warned like UNSUPPORTED).
NOT_YET: set[str] = set()
