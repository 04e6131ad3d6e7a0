import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from child.launch import TESTS, child_cmd

from tunegraph.trainer.errors import TrainingError
from tunegraph.trainer.training.checkpoint import (
    MARKER,
    clean_stale,
    find_latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
)


def _save(out, step, **kw):
    return save_checkpoint(
        out,
        step,
        tensors={"adapter.safetensors": {"w": torch.full((4, 4), float(step))}},
        json={"state.json": {"step": step}},
        **kw,
    )


def _scratch(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.startswith("."))


def test_roundtrip_tensors_objects_json_and_files(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    path = save_checkpoint(
        tmp_path,
        7,
        tensors={"adapter.safetensors": model.state_dict()},
        objects={"optimizer.pt": opt.state_dict()},
        json={"state.json": {"step": 7, "epoch": 1}},
        files={"extra.txt": lambda p: p.write_text("hello")},
    )
    assert path == tmp_path / "checkpoint-7" and (path / MARKER).is_file()
    ckpt = load_checkpoint(path)
    assert ckpt.step == 7
    assert torch.equal(ckpt.tensors["adapter.safetensors"]["weight"], model.weight.detach())
    exp_avg = ckpt.objects["optimizer.pt"]["state"][0]["exp_avg"]
    assert torch.equal(exp_avg, opt.state_dict()["state"][0]["exp_avg"])
    assert ckpt.json["state.json"] == {"epoch": 1, "step": 7}
    assert ckpt.file("extra.txt").read_text() == "hello"
    assert _scratch(tmp_path) == []


def test_latest_ignores_unmarked_and_temp_dirs(tmp_path):
    _save(tmp_path, 1)
    _save(tmp_path, 10)
    (tmp_path / "checkpoint-20").mkdir()  # half-written by something, no marker
    (tmp_path / ".checkpoint-30.tmp-99999").mkdir()
    (tmp_path / "checkpoint-abc").mkdir()
    assert find_latest_checkpoint(tmp_path) == tmp_path / "checkpoint-10"
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1, 10]
    assert find_latest_checkpoint(tmp_path / "nothing-here") is None


def test_writer_failure_keeps_previous_and_removes_temp(tmp_path):
    _save(tmp_path, 1)

    def boom(path):
        path.write_bytes(b"x" * 1000)
        raise RuntimeError("writer crashed")

    with pytest.raises(TrainingError, match="checkpoint-2.*writer crashed.*previous checkpoints are kept"):
        _save(tmp_path, 2, files={"adapter2.bin": boom})
    assert find_latest_checkpoint(tmp_path) == tmp_path / "checkpoint-1"
    assert not (tmp_path / "checkpoint-2").exists()
    assert _scratch(tmp_path) == []


def test_disk_full_keeps_last_good_checkpoint(tmp_path):
    _save(tmp_path, 5)

    def enospc(path):
        path.write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    # overwriting the same step must not lose the good one either
    for step in (6, 5):
        with pytest.raises(TrainingError, match="disk is full") as info:
            _save(tmp_path, step, files={"big.bin": enospc})
        assert isinstance(info.value.__cause__, OSError)
    latest = find_latest_checkpoint(tmp_path)
    assert latest == tmp_path / "checkpoint-5"
    assert torch.equal(load_checkpoint(latest).tensors["adapter.safetensors"]["w"], torch.full((4, 4), 5.0))
    assert _scratch(tmp_path) == []


def test_overwrite_same_step_replaces_content(tmp_path):
    _save(tmp_path, 3)
    save_checkpoint(tmp_path, 3, tensors={"adapter.safetensors": {"w": torch.zeros(2)}})
    ckpt = load_checkpoint(tmp_path / "checkpoint-3")
    assert torch.equal(ckpt.tensors["adapter.safetensors"]["w"], torch.zeros(2))
    assert ckpt.json == {}  # the old state.json went with the old directory
    assert _scratch(tmp_path) == []


def test_total_limit_prunes_oldest(tmp_path):
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, total_limit=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 4]
    # resuming from an older point and saving there keeps the new one, drops the others oldest first
    _save(tmp_path, 2, total_limit=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 4]
    _save(tmp_path, 5, total_limit=None)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 4, 5]


def test_resolve_resume(tmp_path):
    assert resolve_resume(tmp_path, None) is None
    assert resolve_resume(tmp_path, "none") is None
    assert resolve_resume(tmp_path, "latest") is None  # nothing yet: fresh start
    _save(tmp_path, 4)
    _save(tmp_path, 8)
    assert resolve_resume(tmp_path, "latest") == tmp_path / "checkpoint-8"
    assert resolve_resume(tmp_path, "checkpoint-4") == tmp_path / "checkpoint-4"
    assert resolve_resume(tmp_path, str(tmp_path / "checkpoint-4")) == tmp_path / "checkpoint-4"
    with pytest.raises(TrainingError, match="'checkpoint-99' not found"):
        resolve_resume(tmp_path, "checkpoint-99")
    (tmp_path / "checkpoint-9").mkdir()
    with pytest.raises(TrainingError, match="not a complete checkpoint"):
        resolve_resume(tmp_path, "checkpoint-9")
    with pytest.raises(TrainingError, match="not a complete checkpoint"):
        load_checkpoint(tmp_path / "checkpoint-9")


def test_unwritable_output_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(TrainingError, match="cannot be created"):
        _save(blocker / "out", 1)


def test_missing_file_in_checkpoint_is_reported(tmp_path):
    path = _save(tmp_path, 1)
    (path / "state.json").unlink()
    with pytest.raises(TrainingError, match="missing state.json"):
        load_checkpoint(path)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_clean_stale_restores_moved_aside_checkpoint(tmp_path):
    # a writer killed between "move old checkpoint-3 aside" and "rename new one in"
    pid = _dead_pid()
    old = _save(tmp_path, 3).rename(tmp_path / f".checkpoint-3.old-{pid}")
    (tmp_path / f".checkpoint-4.tmp-{pid}").mkdir()
    assert find_latest_checkpoint(tmp_path) is None
    clean_stale(tmp_path)
    assert not old.exists()
    assert find_latest_checkpoint(tmp_path) == tmp_path / "checkpoint-3"
    assert _scratch(tmp_path) == []


def test_sigkill_mid_write_never_leaves_a_pickable_checkpoint(tmp_path):
    _save(tmp_path, 1)
    proc = subprocess.Popen(
        child_cmd("checkpoint_writer", "slow", tmp_path, 2), stdout=subprocess.PIPE, text=True, cwd=TESTS
    )
    for _ in range(3):  # let a few files land, then kill without any chance to clean up
        assert proc.stdout.readline().strip() == "writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    leftovers = _scratch(tmp_path)
    assert leftovers == [f".checkpoint-2.tmp-{proc.pid}"]
    assert find_latest_checkpoint(tmp_path) == tmp_path / "checkpoint-1"
    assert resolve_resume(tmp_path, "latest") == tmp_path / "checkpoint-1"
    # the next save clears the dead writer's scratch dir
    time.sleep(0.05)
    _save(tmp_path, 2)
    assert _scratch(tmp_path) == []
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1, 2]


@pytest.mark.parametrize("delay", [0.3, 0.75])
def test_sigkill_at_any_moment_leaves_only_whole_checkpoints(tmp_path, delay):
    proc = subprocess.Popen(
        child_cmd("checkpoint_writer", "loop", tmp_path), stdout=subprocess.PIPE, text=True, cwd=TESTS
    )
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(delay)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    clean_stale(tmp_path)
    found = list_checkpoints(tmp_path)
    assert found, "the writer should have finished some checkpoints"
    for step, path in found:
        ckpt = load_checkpoint(path)
        n = ckpt.json["s.json"]["n"]
        assert ckpt.step == step == n % 4
        assert torch.equal(ckpt.tensors["a.safetensors"]["w"], torch.full((128, 128), float(n)))
    assert _scratch(tmp_path) == []
