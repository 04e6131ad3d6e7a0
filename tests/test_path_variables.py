"""SimpleTuner's {model_family}, {output_dir}, {id} and {env:NAME} in multidatabackend.json values."""

from __future__ import annotations

from pathlib import Path

from tunegraph.trainer.config import TrainConfig
from tunegraph.trainer.data.backends import parse_backends


def test_variables_are_filled_as_simpletuner_does(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TG_DATA", str(tmp_path / "data"))
    monkeypatch.delenv("TG_UNSET", raising=False)
    (tmp_path / "data" / "subject").mkdir(parents=True)
    entries = [
        {"id": "subject", "type": "local", "instance_data_dir": "{env:TG_DATA}/{id}",
         "cache_dir_vae": "cache/vae/{model_family}/{id}", "instance_prompt": "{unknown} {env:TG_UNSET}x",
         "caption_strategy": "instanceprompt"},
        {"id": "text-embeds", "dataset_type": "text_embeds", "default": True,
         "cache_dir": "{output_dir}/text/{model_family}"},
    ]  # fmt: skip
    cfg = TrainConfig.from_dict({"model_family": "hidream", "output_dir": "out/run1"})
    b = parse_backends(entries, cfg, "m.json")
    (ds,) = b.datasets
    assert ds.instance_data_dir == tmp_path / "data" / "subject"
    assert ds.cache_dir_vae == Path("cache/vae/hidream/subject")
    assert ds.instance_prompt == "{unknown} x"  # unknown names stay; unset env is empty
    assert b.text_embeds.cache_dir == Path("out/run1/text/hidream")


def test_config_values_take_env_variables(monkeypatch):
    monkeypatch.setenv("TG_OUT", "/tmp/runs")
    cfg = TrainConfig.from_dict({"output_dir": "{env:TG_OUT}/a", "validation_prompt": "{model_family} {x}"})
    assert cfg.output_dir == "/tmp/runs/a"
    assert cfg.validation_prompt == "{model_family} {x}"  # config.json gets {env:} only, as in SimpleTuner
