"""The `tunegraph` command line as a user runs it: --help everywhere, --json summaries last on stdout."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tunegraph.trainer.commands.demo import write_demo_config

COMMANDS = ["train", "cache", "validate", "export", "demo", "tiny-models"]


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "tunegraph.trainer.cli", *args], capture_output=True, text=True, timeout=300
    )
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def last_json(proc: subprocess.CompletedProcess) -> dict:
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command: str) -> None:
    proc = cli(command, "--help")
    assert f"usage: tunegraph {command}" in proc.stdout and "--json" in proc.stdout


def test_cache_then_rerun_reuses_everything(tmp_path: Path) -> None:
    config = write_demo_config(tmp_path / "demo", steps=2)
    first = last_json(cli("cache", "--config", str(config), "--json"))
    ds = first["datasets"][0]
    assert ds["id"] == "demo-shapes" and ds["images_found"] == 8 and ds["latents_cached"] == 8
    assert ds["buckets"] == {"64x64": 8} and first["text_embeds"]["cached"] >= 8
    again = last_json(cli("cache", "--config", str(config), "--json"))
    assert again["datasets"][0]["latents_reused"] == 8 and again["datasets"][0]["latents_cached"] == 0
    assert again["text_embeds"]["cached"] == 0


def test_tiny_models_and_validate_with_adapter(tmp_path: Path) -> None:
    written = last_json(cli("tiny-models", "--out", str(tmp_path / "models"), "--json"))
    assert (Path(written["flux"]) / "model_index.json").exists()
    config = write_demo_config(tmp_path / "demo", steps=2)
    sets = [
        "--set",
        f"pretrained_model_name_or_path={written['flux']}",
        "--set",
        "model_flavour=",
        "--set",
        "validation_resolution=64x64",
        "--set",
        "eval_steps_interval=",
    ]
    trained = last_json(cli("train", "--config", str(config), "--json", *sets))
    assert trained["steps"] == 2
    shown = last_json(cli("validate", "--config", str(config), "--json", *sets))
    assert shown["step"] == 2 and shown["adapter"] == trained["adapter"]
    assert all(Path(p).exists() for p in shown["validation_images"])
    missing = cli(
        "validate", "--config", str(config), "--adapter", str(tmp_path / "nope.safetensors"), check=False
    )
    assert missing.returncode == 2 and "nope.safetensors: file not found" in missing.stderr


@pytest.mark.parametrize("command", ["train", "check", "cache", "validate"])
def test_missing_config_file_is_a_clear_error_before_torch_loads(tmp_path: Path, command: str) -> None:
    cmd = [sys.executable, "-X", "importtime", "-m", "tunegraph.trainer.cli", command]
    proc = subprocess.run([*cmd, "--config", str(tmp_path / "config.json")], capture_output=True, text=True)
    assert proc.returncode == 2 and f"error: {tmp_path / 'config.json'}: file not found" in proc.stderr
    imported = [line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if "|" in line]
    assert "tunegraph.trainer.config" in imported and "torch" not in imported  # seconds, not a torch import
