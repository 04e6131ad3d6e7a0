"""Config loading: SimpleTuner's files load as they are; bad input gets errors naming file and key."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from tunegraph.trainer.config import TrainConfig, load_config
from tunegraph.trainer.errors import ConfigError
from tunegraph.trainer.jsonfile import load_json, parse_json

# Copies of SimpleTuner users' real config files (../shared/reference-configs), loaded as they are.
REF = Path(__file__).parent / "data" / "reference-configs"


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize("path", sorted(REF.rglob("*.json")), ids=lambda p: str(p.relative_to(REF)))
def test_every_reference_file_parses(path: Path) -> None:
    assert isinstance(load_json(path), (dict, list))


def test_reference_hidream_config_loads_with_coercion(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="tunegraph"):
        cfg = load_config(REF / "hidream" / "config.json")
    assert cfg.learning_rate == pytest.approx(4e-5)  # "4e-5"
    assert cfg.gradient_checkpointing is True  # "true"
    assert cfg.validation_num_inference_steps == 20  # "20"
    assert cfg.model_family == "hidream" and cfg.lora_type == "lycoris"
    assert cfg.aspect_bucket_rounding == 2 and cfg.resolution == 1024
    # every key of the reference config is acted on now (offload_during_startup: training/phases.py);
    # "validation_torch_compile": "false" is a no-op, so no warning at all (test_config_keys_used.py
    # checks the warning itself)
    assert cfg.offload_during_startup is True and cfg.base_model_precision == "int8-quanto"
    assert cfg.warnings == []
    assert sum("not implemented" in r.message for r in caplog.records) == 0


def test_fragments_and_dash_prefixed_keys(tmp_path: Path) -> None:
    frag = load_config(REF / "flux" / "quantised_training_fragment.json")
    assert frag.lora_rank == 16 and frag.base_model_default_dtype == "bf16"
    lib = load_config(REF / "user_prompt_library_key_fragment.json")
    assert lib.user_prompt_library == "config/user_prompt_library.json"
    p = write(tmp_path, "c.json", '{"--train_batch_size": "4", "--use_ema": "false",}')
    cfg = load_config(p)
    assert cfg.train_batch_size == 4 and cfg.use_ema is False


def test_unknown_key_did_you_mean(tmp_path: Path) -> None:
    p = write(tmp_path, "config.json", '{"learning_rat": 1e-4}')
    with pytest.raises(
        ConfigError, match=r"config.json: unknown key 'learning_rat' \(did you mean 'learning_rate'\?\)"
    ):
        load_config(p)


def test_wrong_type_names_key(tmp_path: Path) -> None:
    p = write(tmp_path, "config.json", '{"resolution": "big"}')
    with pytest.raises(ConfigError, match=r"config.json: key 'resolution' expects a number, got 'big'"):
        load_config(p)
    with pytest.raises(ConfigError, match="'train_batch_size' expects a whole number"):
        TrainConfig.from_dict({"train_batch_size": "1.5"})
    with pytest.raises(ConfigError, match="'use_ema' expects true or false"):
        TrainConfig.from_dict({"use_ema": "maybe"})


def test_choice_error_suggests(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'lr_scheduler'.*did you mean 'cosine'"):
        TrainConfig.from_dict({"lr_scheduler": "cosin"})


def test_malformed_json_reports_line_and_column(tmp_path: Path) -> None:
    p = write(tmp_path, "config.json", '{\n  "seed": 1,\n  "output_dir" "x"\n}')
    with pytest.raises(ConfigError, match=r"config.json:3:16: invalid JSON"):
        load_config(p)


def test_trailing_commas_inside_strings_untouched() -> None:
    assert parse_json('{"a": "x,}", "b": [1, 2,],}') == {"a": "x,}", "b": [1, 2]}


def test_learning_rate_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="learning_rate' must be > 0"):
        TrainConfig.from_dict({"learning_rate": "0"})


def test_relative_paths_cwd_then_config_folder(tmp_path: Path, monkeypatch) -> None:
    cfg_dir = tmp_path / "conf"
    cfg_dir.mkdir()
    (cfg_dir / "lyco.json").write_text(json.dumps({"algo": "lokr"}))
    p = write(cfg_dir, "config.json", json.dumps({"lora_type": "lycoris", "lycoris_config": "lyco.json"}))
    elsewhere = tmp_path / "run"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(p)
    assert cfg.input_path("lycoris_config") == cfg_dir / "lyco.json"
    (elsewhere / "lyco.json").write_text("{}")  # the working directory wins
    assert cfg.input_path("lycoris_config") == elsewhere / "lyco.json"
    missing = load_config(p, {"lycoris_config": "nope.json"})
    with pytest.raises(
        ConfigError,
        match=r"key 'lycoris_config': 'nope.json' not found \(tried .*run/nope.json and .*conf/nope.json\)",
    ):
        missing.input_path("lycoris_config")


def test_replace_and_hash() -> None:
    cfg = TrainConfig.from_dict({"checkpointing_steps": "5"})
    assert cfg.checkpoint_step_interval == 5  # SimpleTuner's older alias
    other = cfg.replace(seed=7)
    assert other.seed == 7 and other.checkpoint_step_interval == 5
    assert other.config_hash() != cfg.config_hash()
    assert cfg.replace(seed=cfg.seed).config_hash() == cfg.config_hash()
    with pytest.raises(AttributeError):
        cfg.seed = 3
