"""One run per output folder (trainer/training/run_lock.py): real processes take, hold, lose and share
the lock; two CLI runs started at the same instant on one folder."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
from child.launch import TESTS, child_cmd
from safetensors.torch import load_file

from tunegraph.trainer.commands.demo import write_demo_config
from tunegraph.trainer.config import load_config
from tunegraph.trainer.training import run_lock
from tunegraph.trainer.training.loop import train
from tunegraph.trainer.training.run_lock import (
    ENV,
    LOCK_NAME,
    RunLocked,
    hold_output_dir,
    launcher_env,
    read_holder,
)


def start_holder(folder: Path, env: dict[str, str] | None = None, *extra: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        child_cmd("run_lock_holder", folder, *extra),
        cwd=TESTS,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    line = proc.stdout.readline()
    assert line.strip() == "held", proc.stderr.read()
    return proc


def test_second_run_is_refused_naming_folder_holder_and_what_to_do(tmp_path: Path) -> None:
    holder = start_holder(tmp_path)
    try:
        started = time.monotonic()
        with pytest.raises(RunLocked) as err, hold_output_dir(tmp_path):
            pass
        assert time.monotonic() - started < 2  # at once, no waiting for the holder
        msg = str(err.value)
        info = read_holder(tmp_path)
        assert info.pid == holder.pid and info.host == socket.gethostname()
        for part in (str(tmp_path), f"pid {holder.pid}", socket.gethostname(), info.started, "test holder"):
            assert part in msg, (part, msg)
        assert "choose another output_dir" in msg
    finally:
        holder.stdin.close()
        holder.wait(30)
    assert holder.returncode == 0
    assert not (tmp_path / LOCK_NAME).exists()  # released on a normal exit


def test_sigterm_releases_and_a_killed_runs_lock_is_taken_over(tmp_path: Path, caplog) -> None:
    term = start_holder(tmp_path / "term", None, "cli")
    term.send_signal(signal.SIGTERM)
    term.wait(30)
    assert not (tmp_path / "term" / LOCK_NAME).exists()  # SIGTERM -> KeyboardInterrupt -> released

    killed = start_holder(tmp_path / "kill")
    killed.kill()  # SIGKILL: no cleanup; the kernel drops the flock, the file still names the dead run
    killed.wait(30)
    assert read_holder(tmp_path / "kill").pid == killed.pid
    with caplog.at_level(logging.WARNING, logger="tunegraph"), hold_output_dir(tmp_path / "kill"):
        assert read_holder(tmp_path / "kill").pid == os.getpid()
    said = caplog.text
    assert "taking over the lock of a run that is no longer running" in said and f"pid {killed.pid}" in said


def test_without_flock_a_live_holder_blocks_and_a_dead_ones_file_is_taken_over(
    tmp_path: Path, monkeypatch
) -> None:
    holder = start_holder(tmp_path)
    monkeypatch.setattr(run_lock, "fcntl", None)  # as on Windows: O_EXCL file + pid check
    with pytest.raises(RunLocked, match=f"pid {holder.pid}"), hold_output_dir(tmp_path):
        pass
    holder.kill()
    holder.wait(30)
    with hold_output_dir(tmp_path):
        assert read_holder(tmp_path).pid == os.getpid()
    assert not (tmp_path / LOCK_NAME).exists()


def test_the_holder_may_retake_it_but_another_thread_may_not(tmp_path: Path) -> None:
    errors: list[BaseException] = []

    def other_thread() -> None:
        try:
            with hold_output_dir(tmp_path):
                pass
        except RunLocked as e:
            errors.append(e)

    with hold_output_dir(tmp_path, "ComfyUI TrainLoKr", choose="output_name"):
        with hold_output_dir(tmp_path):  # the node holds it, then train() takes it again
            assert read_holder(tmp_path).what == "ComfyUI TrainLoKr"
        assert (tmp_path / LOCK_NAME).exists()  # the inner release keeps the outer hold
        t = threading.Thread(target=other_thread)
        t.start()
        t.join()
    assert len(errors) == 1 and f"pid {os.getpid()}" in str(errors[0])
    assert not (tmp_path / LOCK_NAME).exists()


def test_processes_the_holder_starts_share_its_lock(tmp_path: Path) -> None:
    with hold_output_dir(tmp_path, "ComfyUI TrainLoKr"):
        env = launcher_env(tmp_path)
        assert env[ENV] == f"{os.getpid()}:{tmp_path.resolve()}"
        child = start_holder(tmp_path, {**env, "RANK": "0"})  # rank 0 of the node's torchrun
        child.stdin.close()
        assert child.wait(30) == 0
        assert read_holder(tmp_path).pid == os.getpid()  # the child neither took nor released it
        stranger = subprocess.run(
            child_cmd("run_lock_holder", tmp_path), cwd=TESTS, capture_output=True, text=True
        )
        assert stranger.returncode != 0 and "RunLocked" in stranger.stderr
    assert launcher_env(tmp_path) == {}


# -- two CLI runs started together -------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_config(tmp_path_factory) -> Path:
    return write_demo_config(tmp_path_factory.mktemp("demo"), steps=4)


SETS = {
    "validation_prompt": "",
    "eval_steps_interval": "",
    "checkpoint_step_interval": "",
    "max_train_steps": 4,
}


def test_two_cli_runs_on_one_folder_one_trains_the_other_stops_at_once(
    demo_config: Path, tmp_path: Path
) -> None:
    out, go = tmp_path / "shared", tmp_path / "go"
    procs = {}
    for lr in ("0.01", "0.005"):
        sets = {**SETS, "output_dir": out, "learning_rate": lr}
        args = ["train", "--config", str(demo_config), "--json"] + [
            a for k, v in sets.items() for a in ("--set", f"{k}={v}")
        ]
        cmd = child_cmd("gated_cli", go, *args)  # all start together on `go`
        procs[lr] = subprocess.Popen(
            cmd, cwd=TESTS, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("go.ready-*"))) < 2 and time.monotonic() < deadline:
        assert all(p.poll() is None for p in procs.values()), [p.communicate() for p in procs.values()]
        time.sleep(0.05)
    go.write_text("go")
    ended: dict[str, float] = {}
    results = {}
    while len(ended) < 2:
        for lr, p in procs.items():
            if lr not in ended and p.poll() is not None:
                ended[lr] = time.monotonic()
                results[lr] = (p.returncode, *p.communicate())
        time.sleep(0.01)
    codes = sorted(r[0] for r in results.values())
    assert codes == [0, 2], {lr: (r[0], r[2][-2000:]) for lr, r in results.items()}
    winner = next(lr for lr, r in results.items() if r[0] == 0)
    loser = next(lr for lr, r in results.items() if r[0] == 2)
    assert ended[loser] < ended[winner]  # it stopped at once, while the winner was still training
    errors = [x for x in results[loser][2].splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in results[loser][2]
    assert (
        str(out) in errors[0]
        and f"pid {procs[winner].pid}" in errors[0]
        and socket.gethostname() in errors[0]
    )
    assert "choose another output_dir" in errors[0]
    assert json.loads(results[loser][1].splitlines()[-1])["error"].startswith("output folder")
    assert not (out / LOCK_NAME).exists()

    # the folder holds exactly the winner's run: the same adapter as that config trained alone
    train(load_config(demo_config, {**SETS, "output_dir": str(tmp_path / "solo"), "learning_rate": winner}),
          progress=False)  # fmt: skip
    a = load_file(str(out / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "solo" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
