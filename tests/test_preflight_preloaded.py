"""A model handed in already loaded (the nodes' LoadTrainingModel -> CacheLatents -> TrainLoKr) gets
the same config-only checks as a config's files: by its own shape on the meta device, before any
latent is encoded or module wrapped, and its weights are left untouched."""

from __future__ import annotations

import pytest
import torch
from test_check_command import write_config

from tunegraph.trainer.config import TrainConfig, load_config
from tunegraph.trainer.errors import ConfigError
from tunegraph.trainer.models import load_model
from tunegraph.trainer.models.meta import meta_like
from tunegraph.trainer.preflight import preflight
from tunegraph.trainer.training.run import prepare_run


@pytest.fixture(scope="module")
def hidream():
    return load_model(
        TrainConfig.from_dict({"model_family": "hidream", "model_flavour": "tiny"}), device="cpu"
    )


def test_meta_twin_has_the_loaded_shape_and_no_weights(hidream) -> None:
    twin = meta_like(hidream.transformer)
    assert twin.max_seq == hidream.transformer.max_seq
    assert [n for n, _ in twin.named_modules()] == [n for n, _ in hidream.transformer.named_modules()]
    assert all(p.device.type == "meta" for p in twin.parameters())


def test_preloaded_model_reports_what_would_train(tmp_path, hidream) -> None:
    cfg = load_config(write_config(tmp_path, "hidream", 512))
    before = {k: v.clone() for k, v in list(hidream.transformer.state_dict().items())[:4]}
    report = preflight(cfg, model=hidream)
    assert report["flavour"] == "tiny" and report["adapter"]["wrapped_modules"] == 64
    assert report["datasets"][0]["buckets"] == {"512x1024": 3}
    assert all(torch.equal(v, hidream.transformer.state_dict()[k]) for k, v in before.items())
    # nothing wrapped: LyCORIS would set instance-level forwards on the Linear layers it wraps
    assert not any("forward" in m.__dict__ for m in hidream.transformer.modules())


def test_a_too_large_bucket_fails_before_any_latent_is_cached(tmp_path, hidream) -> None:
    cfg = load_config(write_config(tmp_path, "hidream", 1024))
    with pytest.raises(ConfigError, match=r"key 'resolution' \(1024, pixel\).*8192 patches"):
        prepare_run(cfg, model=hidream)
    assert not (tmp_path / "cache").exists()
    with pytest.raises(ConfigError, match="8192 patches"):  # CacheLatents' check: no adapter yet
        preflight(cfg, model=hidream, adapter=False)
