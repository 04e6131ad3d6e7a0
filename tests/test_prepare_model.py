"""One model path for every command: `cache` then `train` reuse every latent and embed, and
`validate` renders on the base as trained (same dtype, same quantisation)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tunegraph.trainer import cli
from tunegraph.trainer.commands.demo import write_demo_config
from tunegraph.trainer.config import TrainConfig
from tunegraph.trainer.errors import ConfigError
from tunegraph.trainer.models.prepare import prepare_model
from tunegraph.trainer.quantize import module_precision
from tunegraph.trainer.training import validate_run

QUIET = ["eval_steps_interval=", "validation_step_interval=", "checkpoint_step_interval="]
INT8 = ["base_model_precision=int8-quanto", "text_encoder_2_precision=int8-quanto"]


def run_cli(capsys, *args: str) -> dict:
    assert cli.main([*args, "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def sets(*pairs: str) -> list[str]:
    return [arg for pair in pairs for arg in ("--set", pair)]


@pytest.mark.parametrize("precision", ["bf16", "int8-quanto"])
def test_cache_then_train_reuses_every_latent_and_embed(tmp_path: Path, capsys, precision: str) -> None:
    config = str(write_demo_config(tmp_path / "demo", steps=1))
    extra = sets("mixed_precision=bf16", *QUIET, *(INT8 if precision == "int8-quanto" else []))
    cached = run_cli(capsys, "cache", "--config", config, *extra)
    trained = run_cli(capsys, "train", "--config", config, *extra)
    first, second = cached["datasets"][0], trained["cache"]["datasets"][0]
    print(
        f"{precision}: cache {cached['text_embeds']} {first['latents_cached']} latents; train {trained['cache']}"
    )
    assert first["latents_cached"] == 8 and first["latents_reused"] == 0
    assert second["latents_reused"] == 8 and second["latents_cached"] == 0
    assert cached["text_embeds"]["cached"] >= 8
    assert trained["cache"]["text_embeds"] == {"cached": 0, "reused": cached["text_embeds"]["cached"]}


def test_validate_renders_an_int8_adapter_on_the_int8_base(tmp_path: Path, capsys, monkeypatch) -> None:
    config = str(write_demo_config(tmp_path / "demo", steps=1))
    extra = sets(
        "mixed_precision=bf16", *QUIET, "base_model_precision=int8-quanto", "validation_resolution=64x64"
    )
    run_cli(capsys, "train", "--config", config, *extra)
    bases = []

    def spy(cfg, model, output_dir, step, instance_prompt=None):  # the real renderer, noting its base
        bases.append((module_precision(model.transformer), model.dtype))
        return real(cfg, model, output_dir, step, instance_prompt)

    real = validate_run.render_validation
    monkeypatch.setattr(validate_run, "render_validation", spy)
    shown = run_cli(capsys, "validate", "--config", config, *extra)
    assert shown["step"] == 1 and all(Path(p).exists() for p in shown["validation_images"])
    assert bases == [("int8-quanto", torch.bfloat16)]


def test_prepare_model_follows_mixed_precision_and_quantisation() -> None:
    base = {"model_flavour": "tiny"}
    assert prepare_model(TrainConfig.from_dict({**base, "mixed_precision": "no"})).dtype == torch.float32
    model = prepare_model(TrainConfig.from_dict({**base, "base_model_precision": "int8-quanto"}), "cpu")
    assert model.dtype == torch.bfloat16 and module_precision(model.transformer) == "int8-quanto"
    assert next(model.vae.parameters()).dtype == torch.bfloat16


def test_fp16_is_an_error_naming_the_alternatives() -> None:
    with pytest.raises(ConfigError, match="'fp16' is not supported.*'bf16'.*'no'"):
        TrainConfig.from_dict({"model_flavour": "tiny", "mixed_precision": "fp16"})
