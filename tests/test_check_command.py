"""`tunegraph check`: every config-only check, before any weight is loaded or cache entry written."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tunegraph.trainer.cli import main
from tunegraph.trainer.data.demo import make_demo_dataset

ST_PRESET = {"algo": "lokr", "factor": 16, "full_matrix": True, "linear_dim": 10000, "linear_alpha": 1,
             "apply_preset": {"target_module": ["Attention", "FeedForward"]}}  # fmt: skip


def write_config(root: Path, family: str, resolution: int, size=(64, 128), preset=ST_PRESET, **more) -> Path:
    data = make_demo_dataset(root / "data", n=3, size=size)
    (root / "lycoris_config.json").write_text(json.dumps(preset))
    backends = [
        {"id": "subject", "type": "local", "instance_data_dir": str(data), "crop": False,
         "resolution": resolution, "resolution_type": "pixel", "minimum_image_size": 0,
         "caption_strategy": "filename", "cache_dir_vae": str(root / "cache" / "{model_family}" / "{id}")},
        {"id": "text", "dataset_type": "text_embeds", "default": True, "cache_dir": str(root / "cache" / "text")},
    ]  # fmt: skip
    (root / "multidatabackend.json").write_text(json.dumps(backends))
    config = {"model_family": family, "model_flavour": "tiny", "lora_type": "lycoris",
              "lycoris_config": "lycoris_config.json", "data_backend_config": "multidatabackend.json",
              "output_dir": str(root / "out"), "push_to_hub": True, "noise_offset": 0.2, **more}  # fmt: skip
    (root / "config.json").write_text(json.dumps(config))
    return root / "config.json"


def test_check_prints_what_would_be_trained_and_writes_nothing(tmp_path, capsys):
    path = write_config(tmp_path, "hidream", 512)  # 512 px shorter edge, 1:2, no crop: 512x1024
    assert main(["check", "--config", str(path)]) == 0
    text = capsys.readouterr().out
    assert "hidream / tiny" in text and "LyCORIS lokr, wrapping 64 modules" in text
    assert "subject: 3 images (0 skipped)" in text and "512x1024: 3" in text
    assert "noise_offset=0.2" in text and "push_to_hub" not in text
    assert main(["check", "--config", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["adapter"]["wrapped_modules"] == 64 and report["datasets"][0]["buckets"] == {"512x1024": 3}
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "family,resolution,preset,message",
    [
        ("hidream", 1024, ST_PRESET, r"key 'resolution' \(1024, pixel\).*1024x2048 px is 8192 patches"),
        (
            "flux",
            256,
            {"algo": "lokr", "apply_preset": {"target_module": ["MOEFeedForward"]}},
            "match no module",
        ),
    ],
)
def test_config_errors_are_one_line_before_loading(tmp_path, capsys, family, resolution, preset, message):
    path = write_config(tmp_path, family, resolution, preset=preset)
    assert main(["check", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and re.search(message, err[-1]) and "Traceback" not in "".join(err)
    assert main(["train", "--config", str(path)]) == 2  # train runs the same checks first
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "cache").exists()
