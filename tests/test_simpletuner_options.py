"""SimpleTuner's complete option list: every real key is accepted, only invented ones are errors."""

from __future__ import annotations

import logging

import pytest

from tunegraph.trainer import simpletuner_options as st
from tunegraph.trainer.config import TrainConfig
from tunegraph.trainer.config_keys import FLOW_NOOPS, IGNORED, KEYS, OWN_KEYS, UNSUPPORTED
from tunegraph.trainer.data.backends import IMAGE_KEYS, TEXT_KEYS, parse_backends
from tunegraph.trainer.errors import ConfigError


def test_list_names_its_source_and_is_complete() -> None:
    assert st.SOURCE["repository"] == "https://github.com/bghira/SimpleTuner"
    dates = [r["date"] for r in st.SOURCE["releases"]]
    assert dates[0] <= "2024-08-31" and dates[-1] >= "2026-01-01"  # from Flux's first release to 2026
    assert len(st.CONFIG_DEFAULTS) > 500 and len(st.DATASET_KEYS) > 150


def test_implemented_keys_are_simpletuner_keys() -> None:
    assert set(KEYS) - OWN_KEYS <= set(st.CONFIG_DEFAULTS)
    assert OWN_KEYS <= set(KEYS)
    assert (IMAGE_KEYS | TEXT_KEYS) <= st.DATASET_KEYS
    assert not set(UNSUPPORTED) & set(KEYS) and not IGNORED & set(KEYS)


ISSUE_KEYS = {
    "controlnet": False,
    "disable_bucket_pruning": True,
    "vae_cache_ondemand": True,
    "pretrained_evaluation_model_name_or_path": "openai/clip-vit-large-patch14",
    "conditioning_multidataset_sampling": "random",
    "timestep_bias_strategy": "later",
    "loss_type": "huber",
    "freeze_encoder_strategy": "after",
}


@pytest.mark.parametrize("name,value", sorted(ISSUE_KEYS.items()))
def test_real_configs_keys_are_accepted(name: str, value) -> None:
    TrainConfig.from_dict({name: value, f"--{name}": value})


def test_one_warning_says_what_happens_instead(caplog) -> None:
    data = {
        "enable_chunked_feed_forward": True,  # memory only
        "noise_offset": 0.3,  # flow matching: SimpleTuner skips it
        "masked_loss_probability": 0.5,  # changes training, not implemented
        "push_to_hub": True,  # no effect on a local run: quiet
        "webhook_config": {"url": "x"},
        "controlnet": False,  # SimpleTuner's default: nothing to say
    }
    with caplog.at_level(logging.WARNING, logger="tunegraph"):
        cfg = TrainConfig.from_dict(data, source="config.json")
    (warning,) = cfg.warnings
    assert warning.startswith("config.json: SimpleTuner keys not implemented by TuneGraph")
    assert "masked_loss_probability=0.5 (trains as with its default 1.0)" in warning
    assert "memory/speed only" in warning and "enable_chunked_feed_forward=True" in warning
    assert "flow-matching" in warning and "noise_offset=0.3" in warning
    for quiet in ("push_to_hub", "webhook_config", "controlnet"):
        assert quiet not in warning
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
    assert {
        "noise_offset",
        "snr_gamma",
        "timestep_bias_strategy",
        "validation_guidance_rescale",
    } <= FLOW_NOOPS


def test_invented_key_is_an_error_with_did_you_mean() -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'disable_bucket_pruneing'.*'disable_bucket_pruning'"):
        TrainConfig.from_dict({"disable_bucket_pruneing": True}, source="config.json")


def test_real_dataset_keys_are_accepted(tmp_path) -> None:
    entries = [
        {
            "id": "hf", "type": "local", "instance_data_dir": str(tmp_path), "caption_column": "text",
            "dataset_name": "user/set", "image_column": "image", "hash_filenames": True,
            "preserve_data_backend_cache": True, "max_num_samples": 10,
        },
        {"id": "text", "dataset_type": "text_embeds", "default": True, "cache_dir": "c"},
    ]  # fmt: skip
    b = parse_backends(entries, TrainConfig.from_dict({}), "m.json")
    (warning,) = b.warnings
    assert "max_num_samples=10" in warning and "caption_column='text'" in warning
    assert "hash_filenames" not in warning and "preserve_data_backend_cache" not in warning
    with pytest.raises(ConfigError, match=r"unknown key 'image_colum'.*'image_column'"):
        parse_backends([{**entries[0], "image_colum": "x"}], TrainConfig.from_dict({}), "m.json")
