"""Preflight checks validation_resolution (comma lists, SimpleTuner's forms) against the model's
positional limit as it checks training buckets: one `error:` line naming the file and key, before
any weight is loaded or cache entry written (`tunegraph check` and `tunegraph train`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunegraph.trainer.cli import main
from tunegraph.trainer.data.demo import make_demo_dataset

LOKR = {"algo": "lokr", "factor": 4, "linear_dim": 10000, "linear_alpha": 1,
        "apply_preset": {"target_module": ["Attention"]}}  # fmt: skip


def write_config(root: Path, family: str, **keys) -> Path:
    data = make_demo_dataset(root / "data", n=2, size=(64, 64))
    (root / "lycoris_config.json").write_text(json.dumps(LOKR))
    backends = [
        {"id": "subject", "instance_data_dir": str(data), "resolution": 64, "resolution_type": "pixel",
         "caption_strategy": "filename", "cache_dir_vae": str(root / "cache" / "vae")},
        {"id": "text", "dataset_type": "text_embeds", "default": True, "cache_dir": str(root / "cache" / "text")},
    ]  # fmt: skip
    (root / "multidatabackend.json").write_text(json.dumps(backends))
    config = {"model_family": family, "model_flavour": "tiny", "lora_type": "lycoris",
              "lycoris_config": "lycoris_config.json", "data_backend_config": "multidatabackend.json",
              "output_dir": str(root / "out"), "validation_prompt": "a red circle", **keys}  # fmt: skip
    (root / "config.json").write_text(json.dumps(config))
    return root / "config.json"


@pytest.mark.parametrize(
    "value,message",
    [  # HiDream pads a non-square image to 4096 patches (the real and the tiny model alike)
        (
            "1024x1024,1536x1024",
            "1536x1024 px is 6144 patches; HiDream takes non-square images of at most 4096",
        ),
        ("1024x", "'1024x' is not WIDTHxHEIGHT or a single number"),
    ],
)
def test_bad_validation_resolution_is_one_line_before_loading(tmp_path, capsys, value, message) -> None:
    path = write_config(tmp_path, "hidream", validation_resolution=value)
    for command in ("check", "train"):
        assert main([command, "--config", str(path)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith(f"error: {path}: key 'validation_resolution': ") and message in err[-1], err
        assert "Traceback" not in "\n".join(err)
    assert not (tmp_path / "cache").exists()  # nothing cached, no weight loaded


def test_sizes_the_model_takes_pass_and_are_listed(tmp_path, capsys) -> None:
    # 1280x768 is 3840 patches; any square size pads nothing; Flux has no such limit
    path = write_config(tmp_path / "h", "hidream", validation_resolution="1024x1024, 1280x768,2048")
    assert main(["check", "--config", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["validation_resolutions"] == ["1024x1024", "1280x768", "2048x2048"]
    path = write_config(tmp_path / "f", "flux", validation_resolution="1536x1024")
    assert main(["check", "--config", str(path)]) == 0
    assert "validate: at 1536x1024" in capsys.readouterr().out


def test_not_checked_when_validation_is_off(tmp_path, capsys) -> None:
    path = write_config(tmp_path, "hidream", validation_resolution="1536x1024", disable_validation=True)
    assert main(["check", "--config", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["validation_resolutions"] == []
