import json
import logging
from pathlib import Path

import pytest

from tunegraph.trainer.config import TrainConfig
from tunegraph.trainer.errors import ConfigError
from tunegraph.trainer.training.prompts import (
    load_prompt_library,
    parse_resolutions,
    safe_name,
    validation_image_path,
    validation_prompts,
)

REFERENCE = Path(__file__).parent / "data" / "reference-configs" / "user_prompt_library.json"


def _cfg(tmp_path, **values):
    return TrainConfig.from_dict(values, base_dir=tmp_path, source=str(tmp_path / "config.json"))


def _library(tmp_path, data, name="library.json"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_prompt_library_with_token_replaced_by_instance_prompt(tmp_path):
    _library(tmp_path, {"anime_<token>": "an anime portrait of <token>", "woman": "a portrait of a woman"})
    cfg = _cfg(tmp_path, validation_prompt="a photo of <token>", user_prompt_library="library.json")
    prompts = validation_prompts(cfg, instance_prompt="sks dog")
    assert prompts == [
        ("validation", "a photo of sks dog"),
        ("anime_sks dog", "an anime portrait of sks dog"),
        ("woman", "a portrait of a woman"),
    ]
    # cfg.instance_prompt wins over the dataset's
    cfg2 = cfg.replace(instance_prompt="zxq cat")
    assert validation_prompts(cfg2, instance_prompt="sks dog")[1] == (
        "anime_zxq cat",
        "an anime portrait of zxq cat",
    )


def test_reference_library_loads_with_trailing_commas(tmp_path):
    if not REFERENCE.exists():
        pytest.skip("reference configs not present")
    text = REFERENCE.read_text().replace('"\n}', '",\n}')  # the trailing comma users paste
    _library(tmp_path, text)
    cfg = _cfg(tmp_path, user_prompt_library="library.json")
    prompts = dict(validation_prompts(cfg, instance_prompt="Mira"))
    assert len(prompts) == 15
    assert prompts["chef_Mira"].startswith("a high-quality, detailed photograph of Mira as a sous-chef")
    assert not any("<token>" in k or "<token>" in v for k, v in prompts.items())


def test_token_without_instance_prompt_stays_and_warns(tmp_path, caplog):
    cfg = _cfg(tmp_path, validation_prompt="a photo of <token>")
    with caplog.at_level(logging.WARNING, logger="tunegraph"):
        assert validation_prompts(cfg) == [("validation", "a photo of <token>")]
    assert "no instance_prompt" in caplog.text


def test_nicknames_that_collide_as_file_names_are_made_unique(tmp_path):
    _library(tmp_path, {"validation": "second", "a b": "x", "a/b": "y"})
    cfg = _cfg(tmp_path, validation_prompt="first", user_prompt_library="library.json")
    nicks = [n for n, _ in validation_prompts(cfg)]
    assert nicks == ["validation", "validation-2", "a b", "a/b-2"]
    assert len({safe_name(n) for n in nicks}) == 4


def test_library_dict_entries_and_bad_entries(tmp_path):
    path = _library(tmp_path, {"a": {"prompt": "from dict"}, "b": "plain"})
    assert load_prompt_library(path) == {"a": "from dict", "b": "plain"}
    bad = _library(tmp_path, {"a": 3}, "bad.json")
    with pytest.raises(ConfigError, match="bad.json: prompt 'a' must be a non-empty string"):
        load_prompt_library(bad)
    not_obj = _library(tmp_path, ["x"], "list.json")
    with pytest.raises(ConfigError, match="must be a JSON object"):
        load_prompt_library(not_obj)
    cfg = _cfg(tmp_path, user_prompt_library="missing.json")
    with pytest.raises(ConfigError, match="user_prompt_library.*not found"):
        validation_prompts(cfg)


def test_parse_resolutions():
    assert parse_resolutions("1024x1024,1280x768") == [(1024, 1024), (1280, 768)]
    assert parse_resolutions("1024") == [(1024, 1024)]
    assert parse_resolutions(512) == [(512, 512)]
    assert parse_resolutions(" 768X512 , 1024 ,") == [(768, 512), (1024, 1024)]
    assert parse_resolutions(["256x128", 256, "256x128"]) == [(256, 128), (256, 256)]
    assert parse_resolutions("1000x770") == [(992, 768)]  # Flux needs multiples of 16
    assert parse_resolutions("100", multiple=64) == [(64, 64)]
    for bad in ("big", "1024x", "10x20x30", "", "8"):
        with pytest.raises(ConfigError, match="validation_resolution"):
            parse_resolutions(bad)


def test_validation_image_path(tmp_path):
    path = validation_image_path(tmp_path, 250, "anime_sks dog/<x>", 1280, 768)
    assert path == tmp_path / "validation" / "step-000250" / "anime_sks_dog_x-1280x768.png"
    assert validation_image_path("out", 0, "validation", 64, 64) == Path(
        "out/validation/step-000000/validation-64x64.png"
    )
    assert safe_name("...") == "prompt"
    assert len(safe_name("x" * 300)) == 100
