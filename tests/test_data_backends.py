"""multidatabackend.json parsing: SimpleTuner keys, coercion, defaults, path resolution, bad input."""

import json
import logging
from pathlib import Path

import pytest

from tunegraph.trainer.config import TrainConfig
from tunegraph.trainer.data.backends import load_backends, parse_backends
from tunegraph.trainer.errors import ConfigError
from tunegraph.trainer.jsonfile import load_json

REFS = Path(__file__).parent / "data" / "reference-configs"


def cfg(**values):
    return TrainConfig.from_dict(values)


def image(id="ds", **keys):
    return {"id": id, "type": "local", "instance_data_dir": "imgs", **keys}


def test_reference_flux_file_parses_with_its_values(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    entries = load_json(REFS / "flux" / "multidatabackend.json")
    b = parse_backends(entries, cfg(model_family="flux"), "flux/multidatabackend.json")
    assert [d.id for d in b.datasets] == [
        "pseudo-camera-10k-flux",
        "dreambooth-subject",
        "dreambooth-subject-512",
    ]
    reg, subject, subject512 = b.datasets
    assert (
        reg.is_regularisation_data and reg.crop and reg.crop_aspect == "square" and reg.crop_style == "center"
    )
    assert reg.caption_strategy == "filename" and reg.repeats == 0 and reg.resolution == 512
    assert subject.caption_strategy == "instanceprompt" and subject.repeats == 1000 and not subject.crop
    assert subject.instance_prompt == "the name of your subject goes here"
    assert (subject.resolution, subject512.resolution) == (1024, 512)
    assert (
        subject.instance_data_dir == subject512.instance_data_dir == tmp_path / "datasets/dreambooth-subject"
    )
    assert subject.cache_dir_vae == Path("cache/vae/flux/dreambooth-subject")
    assert b.text_embeds.cache_dir == Path("cache/text/flux") and b.text_embeds.write_batch_size == 128
    assert b.warnings == []


def test_reference_hidream_file_parses(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    b = parse_backends(load_json(REFS / "hidream" / "multidatabackend.json"), cfg(), "hidream.json")
    assert [d.resolution for d in b.datasets] == [1024, 1024]
    assert b.text_embeds.id == "text-embeds" and b.text_embeds.cache_dir == Path("cache/text/hidream")


def test_strings_are_coerced_and_globals_fill_defaults():
    c = cfg(resolution=768, resolution_type="pixel", minimum_image_size=0, aspect_bucket_rounding=3)
    (d,) = parse_backends(
        [image(crop="true", repeats="3", probability="0.5", maximum_image_size="0")], c, "m.json"
    ).datasets
    assert d.crop is True and d.repeats == 3 and d.probability == 0.5
    assert (d.resolution, d.resolution_type, d.aspect_bucket_rounding) == (768, "pixel", 3)
    assert d.minimum_image_size is None and d.maximum_image_size is None  # 0 means "no limit"
    assert d.caption_strategy == "filename" and d.crop_style == "random"  # SimpleTuner defaults


def test_default_cache_dirs_follow_cache_dir_and_family():
    b = parse_backends([image("a")], cfg(model_family="hidream", cache_dir="/tmp/c"), "m.json")
    assert b.datasets[0].cache_dir_vae == Path("/tmp/c/vae/hidream/a")
    assert b.text_embeds.cache_dir == Path("/tmp/c/text/hidream")
    b = parse_backends([image("a")], cfg(cache_dir_vae="v", cache_dir_text="t"), "m.json")
    assert b.datasets[0].cache_dir_vae == Path("v/a") and b.text_embeds.cache_dir == Path("t")


def test_disabled_datasets_are_dropped():
    entries = [image("a", disabled=True), image("b"), image("c", disable="true"),
               {"id": "t", "dataset_type": "text_embeds", "cache_dir": "x", "disabled": True}]  # fmt: skip
    b = parse_backends(entries, cfg(), "m.json")
    assert [d.id for d in b.datasets] == ["b"]
    assert b.text_embeds.id == "text-embeds"  # the disabled one is not used


def test_unknown_key_names_file_dataset_and_suggests():
    with pytest.raises(ConfigError) as e:
        parse_backends([image("subject", resolutoin=512)], cfg(), "my/multidatabackend.json")
    msg = str(e.value)
    assert "my/multidatabackend.json" in msg and "'subject'" in msg and "resolutoin" in msg
    assert "did you mean 'resolution'" in msg


def test_wrong_type_names_key_and_value():
    with pytest.raises(
        ConfigError, match=r"m.json: dataset 'ds': key 'resolution' expects a number, got 'big'"
    ):
        parse_backends([image(resolution="big")], cfg(), "m.json")
    with pytest.raises(ConfigError, match="key 'crop' expects true or false"):
        parse_backends([image(crop="maybe")], cfg(), "m.json")


@pytest.mark.parametrize(
    "keys, words",
    [
        ({"type": "aws"}, ["'type'", "'aws'", "only 'local'"]),
        ({"dataset_type": "video"}, ["'dataset_type'", "'video'"]),
        ({"caption_strategy": "parquet"}, ["caption_strategy", "'parquet'", "textfile"]),
        ({"crop_style": "face"}, ["crop_style", "'face'"]),
        ({"resolution_type": "pixels"}, ["did you mean 'pixel'"]),
        ({"caption_strategy": "instanceprompt"}, ["needs an instance_prompt"]),
        ({"crop": True, "crop_aspect": "closest"}, ["crop_aspect_buckets"]),
        ({"repeats": -1}, ["'repeats'", "0 or more"]),
        ({"instance_data_dir": ""}, ["instance_data_dir"]),
        ({"metadata_backend": "parquet"}, ["metadata_backend", "'parquet'"]),
    ],
)
def test_bad_values_are_config_errors_naming_the_key(keys, words):
    with pytest.raises(ConfigError) as e:
        parse_backends([image("mine", **keys)], cfg(), "m.json")
    assert "m.json" in str(e.value) and "'mine'" in str(e.value)
    for word in words:
        assert word in str(e.value)


def test_structural_errors():
    with pytest.raises(ConfigError, match="expected a JSON list"):
        parse_backends({"id": "x"}, cfg(), "m.json")
    with pytest.raises(ConfigError, match="dataset #2 has no 'id'"):
        parse_backends([image("a"), {"instance_data_dir": "x"}], cfg(), "m.json")
    with pytest.raises(ConfigError, match="'a' is used twice"):
        parse_backends([image("a"), image("a")], cfg(), "m.json")
    with pytest.raises(ConfigError, match="no enabled image dataset"):
        parse_backends([image("a", disabled=True)], cfg(), "m.json")
    with pytest.raises(ConfigError, match="more than one text_embeds"):
        parse_backends(
            [image("a")] + [{"id": i, "dataset_type": "text_embeds", "default": True} for i in "xy"],
            cfg(),
            "m.json",
        )


def test_known_unsupported_keys_get_one_warning(caplog):
    entries = [
        image("a", minimum_aspect_ratio=0.5, vae_cache_clear_each_epoch=True),
        image("b", max_num_samples=10),
    ]
    with caplog.at_level(logging.WARNING, logger="tunegraph"):
        b = parse_backends(entries, cfg(), "m.json")
    assert len(b.warnings) == 1 and len([r for r in caplog.records if "not implemented" in r.message]) == 1
    for name in ("'a': minimum_aspect_ratio", "'a': vae_cache_clear_each_epoch", "'b': max_num_samples"):
        assert name in b.warnings[0]


def test_relative_data_dir_tries_cwd_then_backend_folder(tmp_path, monkeypatch):
    conf = tmp_path / "conf"
    (conf / "imgs").mkdir(parents=True)
    (conf / "m.json").write_text(json.dumps([image("a")]))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    b = load_backends(cfg(), conf / "m.json")
    assert b.datasets[0].instance_data_dir == conf / "imgs"
    (work / "imgs").mkdir()
    assert load_backends(cfg(), conf / "m.json").datasets[0].instance_data_dir == work / "imgs"


def test_missing_dir_keeps_every_tried_path_for_the_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.json").write_text(json.dumps([image("a", instance_data_dir="nowhere")]))
    d = load_backends(cfg(), tmp_path / "m.json").datasets[0]
    assert d.tried_dirs == (tmp_path / "nowhere", tmp_path.resolve() / "nowhere")


def test_malformed_json_reports_file_line_col(tmp_path):
    p = tmp_path / "m.json"
    p.write_text('[\n  {"id": "a",\n   "resolution" 512}\n]')
    with pytest.raises(ConfigError, match=r"m.json:3:\d+: invalid JSON"):
        load_backends(cfg(), p)


def test_trailing_commas_are_accepted(tmp_path):
    p = tmp_path / "m.json"
    p.write_text('[{"id": "a", "instance_data_dir": "imgs", "repeats": "2",},]')
    assert load_backends(cfg(), p).datasets[0].repeats == 2


def test_closest_and_random_aspect_buckets_accept_weighted_form():
    d = parse_backends(
        [image(crop=True, crop_aspect="random", crop_aspect_buckets=[1.0, {"aspect": 1.5, "weight": 2}])],
        cfg(),
        "m",
    ).datasets[0]
    assert d.crop_aspect_buckets == (1.0, 1.5)
