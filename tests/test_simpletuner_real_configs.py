"""Real published SimpleTuner config sets (tests/data/simpletuner-configs/*/SOURCE.md) train on the
tiny flavour as they are, except model and data paths: the model becomes the built-in tiny one, each
image dataset a small local folder (a Hugging Face dataset becomes `type: local`), output_dir a
temporary folder, training stops after one step, and validation images and the eval loss (tested
elsewhere) are off to keep this cheap. Relative cache paths such as SimpleTuner's
`cache/vae/{model_family}/...` resolve in a temporary working directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tunegraph.trainer.config import load_config
from tunegraph.trainer.data.demo import make_demo_dataset
from tunegraph.trainer.jsonfile import load_json
from tunegraph.trainer.training.loop import train

SETS = Path(__file__).parent / "data" / "simpletuner-configs"
NAMES = sorted(p.name for p in SETS.iterdir() if (p / "config.json").is_file())
# the 2025-10 HiDream example: 512 px shorter edge, no crop; 3:4 images make non-square buckets
ASPECT = {"hidream-example-2025-10": 4 / 3}


def local_backends(config_set: Path, work: Path) -> Path:
    entries = load_json(config_set / "multidatabackend.json")
    smallest = max(int(e.get("minimum_image_size") or 32) for e in entries)  # the configs' own floor
    size = (smallest, round(smallest * ASPECT.get(config_set.name, 1.0)))
    data = make_demo_dataset(work / "images", n=1, size=size)
    for entry in entries:
        if entry.get("dataset_type", "image") == "image":
            entry.update(type="local", instance_data_dir=str(data))
            if entry.get("metadata_backend") not in (None, "discovery", "json"):
                entry["metadata_backend"] = "discovery"
    path = work / "multidatabackend.json"
    path.write_text(json.dumps(entries))
    return path


@pytest.mark.parametrize("name", NAMES)
def test_published_config_trains_on_tiny(name: str, tmp_path: Path, monkeypatch) -> None:
    config_set = SETS / name
    monkeypatch.chdir(tmp_path)
    overrides = {
        "model_flavour": "tiny",
        "pretrained_model_name_or_path": None,
        "data_backend_config": str(local_backends(config_set, tmp_path)),
        "output_dir": str(tmp_path / "out"),
        "max_train_steps": 1,
        "resume_from_checkpoint": None,
        "disable_validation": True,
        "eval_steps_interval": None,
    }
    if (config_set / "lycoris_config.json").is_file():
        overrides["lycoris_config"] = str(config_set / "lycoris_config.json")
    cfg = load_config(config_set / "config.json", overrides)
    summary = train(cfg, progress=False)
    assert summary
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 1 and all(torch.isfinite(torch.tensor(losses)))
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()
    family = cfg.model_family
    assert (tmp_path / "cache" / "vae" / family).is_dir() or not any(
        "{model_family}" in json.dumps(e) for e in load_json(config_set / "multidatabackend.json")
    )
