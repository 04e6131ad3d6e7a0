"""Run folders changing hands (nodes/run_identity.py): superseded runs are never overwritten or deleted,
the identity file is written atomically, a folder without one is foreign and left alone."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tunegraph.nodes.run_identity import RUN_FILE, claim_run_dir, write_identity
from tunegraph.trainer.errors import TrainingError
from tunegraph.trainer.training.checkpoint import MARKER

FINAL = "pytorch_lora_weights.safetensors"


def fake_run(run: Path, tag: str) -> None:
    """What a finished run leaves: a checkpoint, the final adapter, metrics and its config."""
    (run / "checkpoint-4").mkdir()
    (run / "checkpoint-4" / MARKER).write_text(tag)
    (run / FINAL).write_text(tag)
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0, "tag": tag}) + "\n")
    (run / "config").mkdir(exist_ok=True)
    (run / "config" / "config.json").write_text(tag)


def superseded(run: Path) -> dict[str, str]:
    """superseded folder name -> the tag its run left in its final adapter."""
    return {d.name: (d / FINAL).read_text() for d in sorted((run / "superseded").iterdir())}


def test_runs_superseded_again_and_again_each_keep_their_own_folder(tmp_path: Path) -> None:
    run = tmp_path / "run"
    for n, identity in enumerate(["aaa", "bbb", "aaa", "bbb", "aaa"]):
        assert claim_run_dir(run, identity) == "fresh"
        fake_run(run, f"run {n} ({identity})")
    kept = superseded(run)
    assert sorted(kept.values()) == [f"run {n} ({i})" for n, i in enumerate(["aaa", "bbb", "aaa", "bbb"])]
    assert sum(name.startswith("aaa-") for name in kept) == 2  # the same identity twice: two folders
    for name in kept:
        d = run / "superseded" / name
        assert json.loads((d / RUN_FILE).read_text())["identity"] == name.split("-")[0]
        assert (d / "checkpoint-4" / MARKER).read_text() == (d / FINAL).read_text()
        assert (d / "config" / "config.json").read_text() == (d / FINAL).read_text()
        assert (d / "metrics.jsonl").is_file()
    assert (run / FINAL).read_text() == "run 4 (aaa)"
    assert claim_run_dir(run, "aaa") == "resume"  # the same inputs again continue the current run


@pytest.mark.parametrize("identity_file", ["missing", "empty", "garbage"])
def test_a_folder_without_identity_is_foreign_and_left_in_place(tmp_path: Path, identity_file: str) -> None:
    run = tmp_path / "run"
    run.mkdir()
    claim_run_dir(run, "aaa")
    fake_run(run, "precious")
    if identity_file == "missing":
        (run / RUN_FILE).unlink()
    else:
        (run / RUN_FILE).write_text("" if identity_file == "empty" else "{not json")
    before = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    for _ in range(2):  # queued twice: still nothing moves
        with pytest.raises(TrainingError) as err:
            claim_run_dir(run, "bbb")
    msg = str(err.value)
    assert str(run) in msg and "checkpoint-4" in msg and RUN_FILE in msg
    assert "choose another output_name" in msg and "left as they are" in msg
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == before
    assert (run / FINAL).read_text() == "precious"


def test_identity_file_is_replaced_whole_or_not_at_all(tmp_path: Path, monkeypatch) -> None:
    write_identity(tmp_path, "aaa")

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError):
        write_identity(tmp_path, "bbb")
    assert json.loads((tmp_path / RUN_FILE).read_text()) == {"identity": "aaa"}
    assert [p.name for p in tmp_path.iterdir()] == [RUN_FILE]  # no temp file left behind
