"""SimpleTuner's own option list, read from simpletuner_options.json (its source and releases are
noted inside): every config.json key and multidatabackend.json entry key SimpleTuner has had.

A key in these lists is a real SimpleTuner key: TuneGraph accepts it even where it does not act on
it. Which of them TuneGraph implements is trainer/config_keys.py's business, not this file's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

_DATA = json.loads(Path(__file__).with_name("simpletuner_options.json").read_text(encoding="utf-8"))

# config.json key -> SimpleTuner's default (the newest release that has the key)
CONFIG_DEFAULTS: dict[str, Any] = dict(_DATA["config"])
# keys that cannot change a local run (publishing, trackers, launcher, logging): accepted quietly
CONFIG_NO_EFFECT: frozenset[str] = frozenset(_DATA["config_no_effect"])
# keys that change memory or speed only, never the trained weights
CONFIG_SPEED_MEMORY: frozenset[str] = frozenset(_DATA["config_speed_memory"])
# multidatabackend.json entry keys, and those that cannot change what is trained
DATASET_KEYS: frozenset[str] = frozenset(_DATA["dataset"])
DATASET_NO_EFFECT: frozenset[str] = frozenset(_DATA["dataset_no_effect"])
SOURCE: dict[str, Any] = dict(_DATA["source"])

# SimpleTuner applies these only to epsilon/v-prediction models; for flow-matching models (Flux,
# HiDream) its trainer skips them in every release (models/common.py: `if not flow_matching`,
# validation.py leaves guidance_rescale out for flux/flow models). TuneGraph does the same.
FLOW_MATCHING_NOOPS: frozenset[str] = frozenset(
    {
        "noise_offset", "noise_offset_probability", "offset_noise", "snr_gamma", "use_soft_min_snr",
        "soft_min_snr_sigma_data", "snr_weight", "timestep_bias_strategy", "timestep_bias_multiplier",
        "timestep_bias_begin", "timestep_bias_end", "timestep_bias_portion", "validation_guidance_rescale",
        "rescale_betas_zero_snr", "prediction_type", "training_scheduler_timestep_spacing",
        "inference_scheduler_timestep_spacing", "disable_segmented_timestep_sampling",
    }
)  # fmt: skip
