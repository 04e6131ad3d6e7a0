"""Memory by phase: while training steps run, the text encoders (and, without validation, the VAE)
of a model the run loaded are gone; validation still renders the same images from prompt
embeddings encoded with the cache; a lent model gets its components back."""

from __future__ import annotations

import weakref
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tunegraph.trainer.commands.demo import write_demo_config
from tunegraph.trainer.config import load_config
from tunegraph.trainer.models.prepare import prepare_model
from tunegraph.trainer.training import run as run_module
from tunegraph.trainer.training.loop import train
from tunegraph.trainer.training.validate_run import validate_adapter

QUIET = {"eval_steps_interval": None, "checkpoint_step_interval": None, "mixed_precision": "no"}


def config(tmp_path: Path, **keys):
    path = write_demo_config(tmp_path / "demo", steps=2)
    return load_config(path, {**QUIET, "validation_resolution": "64x64", **keys})


def spy_on_loads(monkeypatch) -> dict[str, list]:
    """The real prepare_model, keeping weak references to what it loaded."""
    refs: dict[str, list] = {}

    def prepare(cfg, device=None):
        model = prepare_model(cfg, device)
        refs["encoders"] = [weakref.ref(m) for m in model.text_encoders]
        refs["vae"] = [weakref.ref(model.vae)]
        return model

    monkeypatch.setattr(run_module, "prepare_model", prepare)
    return refs


def alive(refs: list) -> list[bool]:
    return [r() is not None for r in refs]


def test_text_encoders_are_freed_while_training_without_validation(tmp_path, monkeypatch) -> None:
    refs = spy_on_loads(monkeypatch)
    seen = []
    cfg = config(tmp_path, validation_step_interval=None, disable_validation=True)
    train(cfg, control=lambda run: seen.append((alive(refs["encoders"]), alive(refs["vae"]), run)) and False)
    assert len(seen) == 2
    for encoders, vae, run in seen:
        assert encoders == [False, False] and run.model.text_encoders == []
        assert vae == [True]  # kept for a "Validate now" decode, on the CPU (moved off a GPU)


def test_validation_renders_the_same_images_from_embeddings_encoded_with_the_cache(
    tmp_path, monkeypatch
) -> None:
    refs = spy_on_loads(monkeypatch)
    seen = []
    cfg = config(tmp_path, validation_step_interval=2)
    summary = train(
        cfg, control=lambda run: seen.append((alive(refs["encoders"]), alive(refs["vae"]))) and False
    )
    assert seen == [([False, False], [True])] * 2  # encoders freed; the VAE kept (on the CPU) for decodes
    during = [np.asarray(Image.open(p)) for p in summary["validation_images"]]
    # The same adapter file rendered on a freshly loaded full model (every component resident).
    shown = validate_adapter(cfg)
    after = [np.asarray(Image.open(p)) for p in shown["validation_images"]]
    assert shown["step"] == 2 and len(during) == len(after) == 1
    diff = np.abs(during[0].astype(int) - after[0].astype(int))
    assert diff.max() <= 1, diff.max()  # exported-adapter rounding at most; the embeddings are identical


def test_a_lent_model_keeps_its_encoders_and_gets_them_back(tmp_path) -> None:
    cfg = config(tmp_path, validation_step_interval=None, disable_validation=True)
    model = prepare_model(cfg, "cpu")
    before = model.encode_prompts(["a red circle"])["prompt_embeds"]
    during = []  # a prompt not encoded with the cache (the node's "Validate now" caption fallback)
    train(
        cfg,
        model=model,
        control=lambda run: during.append(run.model.encode_prompts(["a red circle"])) and False,
    )
    assert len(during) == 2 and torch.equal(during[0]["prompt_embeds"], before)
    assert len(model.text_encoders) == 2 and model.vae is not None
    assert all(next(m.parameters()).device == torch.device("cpu") for m in [*model.text_encoders, model.vae])
    assert torch.equal(model.encode_prompts(["a red circle"])["prompt_embeds"], before)
