"""LyCORIS presets with SimpleTuner's class names (Attention, FeedForward, MOEFeedForward) train
the diffusers modules in those roles; partly matching lists warn, lists matching nothing fail."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from tiny_flux import tiny_flux

from tunegraph.trainer.adapters import attach_adapter
from tunegraph.trainer.config import TrainConfig
from tunegraph.trainer.errors import ConfigError
from tunegraph.trainer.models import FluxModel, HiDreamModel
from tunegraph.trainer.models.tiny_hidream import tiny_hidream_transformer

# SimpleTuner's config/lycoris_config.json.example, the first HiDream quickstart's preset
ST_EXAMPLE = {"algo": "lokr", "multiplier": 1.0, "full_matrix": True, "linear_alpha": 1, "factor": 16,
              "apply_preset": {"target_module": ["Attention", "FeedForward"],
                               "module_algo_map": {"Attention": {"factor": 16}, "FeedForward": {"factor": 8}}}}  # fmt: skip


def cfg(tmp_path: Path, lyco: dict) -> TrainConfig:
    path = tmp_path / "lycoris_config.json"
    path.write_text(json.dumps(lyco))
    return TrainConfig.from_dict({"lora_type": "lycoris", "lycoris_config": str(path)})


def linears_inside(model: torch.nn.Module, classes: set[str]) -> set[str]:
    return {
        f"{name}.{sub}"
        for name, mod in model.named_modules()
        if type(mod).__name__ in classes
        for sub, m in mod.named_modules()
        if isinstance(m, torch.nn.Linear)
    }


def test_hidream_default_preset_trains_attention_and_every_expert(tmp_path):
    model = tiny_hidream_transformer()
    adapter = attach_adapter(model, cfg(tmp_path, ST_EXAMPLE), HiDreamModel)
    wrapped = set(adapter.wrapped_module_names)
    expected = linears_inside(model, {"HiDreamAttention", "HiDreamImageFeedForwardSwiGLU"})
    assert wrapped == expected
    routed = {n for n in wrapped if ".experts." in n}
    shared = {n for n in wrapped if ".shared_experts." in n}
    # 3 blocks x 4 routed experts x (w1, w2, w3), and each block's shared expert
    assert len(routed) == 3 * 4 * 3 and len(shared) == 3 * 3
    assert any(".ff_t." in n for n in wrapped)  # the double block's text-stream feed-forward
    assert not any(".gate" in n for n in wrapped)  # the router has no Linear; SimpleTuner trains none
    algo_map = adapter.config["apply_preset"]["module_algo_map"]
    assert algo_map["HiDreamImageFeedForwardSwiGLU"] == {"factor": 8}


def test_moe_feedforward_and_flux_feedforward(tmp_path):
    model = tiny_hidream_transformer()
    moe = {"algo": "lokr", "factor": 4, "apply_preset": {"target_module": ["MOEFeedForward"]}}
    adapter = attach_adapter(model, cfg(tmp_path, moe), HiDreamModel)
    assert set(adapter.wrapped_module_names) == linears_inside(model, {"MOEFeedForwardSwiGLU"})
    flux = tiny_flux()
    ff = {"algo": "lokr", "factor": 4, "apply_preset": {"target_module": ["Attention", "FeedForward"]}}
    adapter = attach_adapter(flux, cfg(tmp_path, ff), FluxModel)
    assert set(adapter.wrapped_module_names) == linears_inside(flux, {"FluxAttention", "FeedForward"})


def test_partly_matching_list_warns_and_nothing_matching_fails(tmp_path, caplog):
    lyco = {"algo": "lokr", "factor": 4, "apply_preset": {"target_module": ["Attention", "MOEFeedForward"]}}
    with caplog.at_level(logging.WARNING, logger="tunegraph"):
        adapter = attach_adapter(tiny_flux(), cfg(tmp_path, lyco), FluxModel)  # Flux has no MoE
    assert adapter.wrapped_module_names
    (note,) = [r.message for r in caplog.records if "match no module" in r.message]
    assert "'MOEFeedForward'" in note and "training only 'FluxAttention'" in note
    nothing = {"algo": "lokr", "apply_preset": {"target_module": ["MOEFeedForward", "Conv9d"]}}
    with pytest.raises(ConfigError, match="match no module"):
        attach_adapter(tiny_flux(), cfg(tmp_path, nothing), FluxModel)
