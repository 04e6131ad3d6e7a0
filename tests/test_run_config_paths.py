"""A node-written run config is self-contained: decoy multidatabackend.json / lycoris_config.json
files in the working directory change nothing, and the file replays from the CLI in any cwd."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from tunegraph.nodes.run_config import cache_config, load_run_config, write_run_config
from tunegraph.trainer import cli
from tunegraph.trainer.adapters.lycoris_config import read_lycoris_config
from tunegraph.trainer.data.backends import load_backends
from tunegraph.trainer.data.demo import make_demo_dataset

LOKR = {"algo": "lokr", "linear_dim": 10000, "linear_alpha": 1, "factor": 4, "full_matrix": True,
        "apply_preset": {"target_module": ["Attention"]}}  # fmt: skip


def write_decoys(folder: Path) -> None:
    """What a stray file in ComfyUI's cwd would say: another dataset, another adapter."""
    make_demo_dataset(folder / "elsewhere", n=2, size=(64, 64))
    decoy = [{"id": "decoy", "instance_data_dir": str(folder / "elsewhere"), "resolution": 64},
             {"id": "t", "dataset_type": "text_embeds", "cache_dir": str(folder / "decoy-cache")}]  # fmt: skip
    (folder / "multidatabackend.json").write_text(json.dumps(decoy))
    (folder / "lycoris_config.json").write_text(json.dumps({**LOKR, "factor": 2, "linear_dim": 3}))


def test_decoys_in_the_cwd_change_nothing_and_the_cli_replays_the_run(tmp_path, monkeypatch, capsys) -> None:
    make_demo_dataset(tmp_path / "input" / "shapes", n=4, size=(64, 64))
    backends = [
        {"id": "shapes", "instance_data_dir": str(tmp_path / "input" / "shapes"), "resolution": 64,
         "caption_strategy": "textfile", "cache_dir_vae": str(tmp_path / "cache" / "vae")},
        {"id": "text", "dataset_type": "text_embeds", "default": True, "cache_dir": str(tmp_path / "cache" / "text")},
    ]  # fmt: skip
    cache = SimpleNamespace(model=SimpleNamespace(keys={"model_flavour": "tiny", "mixed_precision": "no"}))
    config = cache_config(cache, tmp_path / "out" / "run", {"max_train_steps": 1, "lora_type": "lycoris"})
    path, _ = write_run_config(tmp_path / "out" / "run", config, backends, LOKR)
    written = json.loads(path.read_text())
    assert (
        Path(written["data_backend_config"]).is_absolute() and Path(written["lycoris_config"]).is_absolute()
    )
    assert Path(written["output_dir"]).is_absolute()

    cwd = tmp_path / "server-cwd"
    cwd.mkdir()
    write_decoys(cwd)
    monkeypatch.chdir(cwd)
    cfg = load_run_config(path)
    assert [d.id for d in load_backends(cfg).datasets] == ["shapes"]
    assert read_lycoris_config(cfg.input_path("lycoris_config"))["factor"] == 4
    # The same file from the command line, run from the decoy folder.
    assert cli.main(["cache", "--config", str(path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [d["id"] for d in summary["datasets"]] == ["shapes"] and summary["datasets"][0]["images_used"] == 4
    assert not (cwd / "decoy-cache").exists()
