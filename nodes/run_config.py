"""Node widgets -> the same SimpleTuner config files the CLI reads, written into the run folder.

TrainLoKr writes `<run>/config/{config,multidatabackend,lycoris_config}.json` and loads them with
`load_config`, so a run started from a graph can be replayed with `tunegraph train --config ...` in
any working directory: every path in them is absolute, so no file in the server's (or a shell's)
working directory can stand in for the run's own.
A run is identified by its folder and a hash of its config (`<run>/tunegraph_run.json`): the same
inputs again resume or reuse it, changed inputs move the old run aside and train afresh (run_identity.py).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ..trainer.adapters.files import read_adapter_metadata
from ..trainer.config import TrainConfig, load_config
from ..trainer.training.run import FINAL_NAME
from .handles import CacheHandle, Datasets
from .run_identity import RUN_FILE, claim_run_dir, previous_identity

__all__ = [
    "RUN_FILE",
    "claim_run",
    "claim_run_dir",
    "finished_adapter",
    "load_run_config",
    "write_run_config",
]


def text_embeds_entry(cache_dir: Path) -> dict[str, Any]:
    return {"id": "text-embeds", "type": "local", "dataset_type": "text_embeds", "default": True,
            "cache_dir": str(cache_dir)}  # fmt: skip


def backend_entries(datasets: Datasets, text_cache_dir: Path) -> list[dict[str, Any]]:
    return [dict(e) for e in datasets.entries] + [text_embeds_entry(text_cache_dir)]


def cache_config(cache: CacheHandle, output_dir: Path, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The config keys that come from the model and the datasets (everything but the training knobs)."""
    return {**cache.model.keys, "output_dir": str(Path(output_dir).resolve()), **(extra or {})}


def run_identity(config: dict[str, Any], backends: list[dict], lycoris: dict | None, start: str = "") -> str:
    """Hash of everything that changes what a run trains (not how it resumes); `start` names the
    checkpoint a chunked run starts from."""
    body = {k: v for k, v in config.items() if k != "resume_from_checkpoint"}
    blob = json.dumps([body, backends, lycoris, start], sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def write_run_config(
    run_dir: Path, config: dict[str, Any], backends: list[dict], lycoris: dict | None, start: str = ""
) -> tuple[Path, str]:
    """Write the three JSON files into `run_dir/config/`; returns (config.json path, identity)."""
    conf = (run_dir / "config").resolve()
    conf.mkdir(parents=True, exist_ok=True)
    config = dict(config)
    if lycoris is not None:
        (conf / "lycoris_config.json").write_text(json.dumps(lycoris, indent=2))
        config["lycoris_config"] = str(conf / "lycoris_config.json")
    (conf / "multidatabackend.json").write_text(json.dumps(backends, indent=2))
    config["data_backend_config"] = str(conf / "multidatabackend.json")
    (conf / "config.json").write_text(json.dumps(config, indent=2))
    return conf / "config.json", run_identity(config, backends, lycoris, start)


def claim_run(
    run_dir: Path, config: dict[str, Any], backends: list[dict], lycoris: dict | None, start: str = ""
) -> tuple[Path, str, str]:
    """Claim `run_dir` for this config (run_identity.claim_run_dir: "resume" or "fresh", a previous
    run's files moved aside first, its config included), then write the config files.
    Returns (config.json path, identity, mode)."""
    if lycoris is not None:
        config = {**config, "lycoris_config": "lycoris_config.json"}
    mode = claim_run_dir(run_dir, run_identity(config, backends, lycoris, start))
    config_path, identity = write_run_config(run_dir, config, backends, lycoris, start)
    return config_path, identity, mode


def load_run_config(config_path: Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Load a written run config; its paths are absolute, so the cwd plays no part."""
    return load_config(config_path, overrides)


def finished_adapter(run_dir: Path, identity: str, steps: int) -> Path | None:
    """The final adapter of an identical, finished run in `run_dir`, else None."""
    final = run_dir / FINAL_NAME
    if not final.is_file() or previous_identity(run_dir) != identity:
        return None
    meta = read_adapter_metadata(final)
    return final if int(meta.get("step", -1)) == int(steps) else None
