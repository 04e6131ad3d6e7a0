"""Multi-process (DDP) training on CPU with gloo: 2 processes under torchrun train the same adapter as
one process with the same global batch; checkpoints resume on another process count; SIGTERM stops
every rank after one agreed step with a checkpoint. Run as a script under torchrun for the gradient
all-reduce check (see `grad_check`), followed by a CLI train in the same process group."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tunegraph.trainer.commands.demo import write_demo_config
from tunegraph.trainer.config import load_config
from tunegraph.trainer.data.sampler import TrainingData
from tunegraph.trainer.errors import TrainingError
from tunegraph.trainer.training.distributed import Dist, TrainingProcesses
from tunegraph.trainer.training.loop import train

PY = sys.executable
TINY = {"validation_prompt": None, "eval_steps_interval": None, "checkpoint_step_interval": 2}
TOL = 1e-5  # measured: 2 x bs1 vs 1 x bs2 differ by ~2e-7 (all-reduce summation order)


def torchrun(nproc: int, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env())


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("WORLD_SIZE", None)
    return env


def cli_args(config: Path, out: Path, **sets) -> list[str]:
    keys = {**TINY, "output_dir": str(out), **sets}
    pairs = [f"{k}={'none' if v is None else v}" for k, v in keys.items()]
    return ["-m", "tunegraph.trainer.cli", "train", "--config", str(config), "--json"] + [
        x for p in pairs for x in ("--set", p)
    ]


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "pytorch_lora_weights.safetensors"))


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return write_demo_config(tmp_path_factory.mktemp("demo"), steps=4)


@pytest.fixture(scope="module")
def one_proc(demo: Path, tmp_path_factory) -> Path:
    """The reference: one process, train_batch_size 2, accumulation 2 (global batch 4), 4 steps."""
    out = tmp_path_factory.mktemp("one")
    train(
        load_config(demo, {**TINY, "output_dir": str(out), "gradient_accumulation_steps": 2}), progress=False
    )
    return out


def test_sharded_plan_is_the_global_plan_split_without_duplicates(demo: Path, tmp_path: Path) -> None:
    cfg = load_config(demo, {**TINY, "output_dir": str(tmp_path), "train_batch_size": 1})
    from tunegraph.trainer.cache.build import prepare_caches
    from tunegraph.trainer.models import load_model

    cached = prepare_caches(cfg, load_model(cfg), progress=False)
    whole = TrainingData(cached, batch_size=2, seed=42, caption_dropout_probability=0.5)
    ranks = [TrainingData(cached, batch_size=1, seed=42, caption_dropout_probability=0.5) for _ in range(2)]
    for r, data in enumerate(ranks):
        data.shard(r, 2)
    assert len(ranks[0]) == len(whole) == 4  # 8 samples -> 4 global batches of 2
    for _ in range(len(whole) + 1):  # into the next epoch
        full = whole.next_batch()
        parts = [d.next_batch() for d in ranks]
        assert torch.equal(torch.cat([p["latents"] for p in parts]), full["latents"])
        assert sum((p["captions"] for p in parts), []) == full["captions"]
    seen = [ref for batch in ranks[0].epoch_plan(0) for ref in batch]
    assert len(seen) == len(set(seen)) == 8  # each sample exactly once per epoch


def test_resume_maps_position_when_the_global_batch_changes(demo: Path, tmp_path: Path) -> None:
    from tunegraph.trainer.cache.build import build_training_data
    from tunegraph.trainer.models import load_model

    cfg = load_config(demo, {**TINY, "output_dir": str(tmp_path), "train_batch_size": 1})
    data = build_training_data(cfg, load_model(cfg), progress=False)
    assert len(data) == 8
    data.load_state_dict({"epoch": 1, "position": 3, "seed": 42, "steps_per_epoch": 4})  # bs1 x 2 procs
    assert (data.epoch, data.position) == (1, 6)  # 3 of 4 steps -> 6 of 8


def test_shard_rows_takes_this_ranks_rows() -> None:
    t = torch.arange(8).reshape(4, 2)
    assert torch.equal(Dist().shard_rows(t), t)
    assert torch.equal(Dist(rank=1, world_size=2).shard_rows(t), t[2:])


def test_two_processes_match_one_with_the_same_global_batch(
    demo: Path, one_proc: Path, tmp_path: Path
) -> None:
    two = tmp_path / "two"
    proc = torchrun(2, *cli_args(demo, two, train_batch_size=1, gradient_accumulation_steps=2))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    assert len(summaries) == 1 and summaries[0]["steps"] == 4  # rank 0 alone prints the summary
    assert "global batch 4 = 1 per process x 2 processes x 2 accumulation" in proc.stderr
    diff = max_diff(adapter(one_proc), adapter(two))
    print(f"max abs diff 2 procs x bs1 vs 1 proc x bs2 (accum 2, 4 steps): {diff:.3g}")
    assert diff < TOL
    assert max(v.abs().max().item() for v in adapter(two).values()) > 100 * TOL  # it trained
    # metrics written once (rank 0), losses = the 1-process losses (mean over ranks)
    m1, m2 = (
        [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (one_proc, two)
    )
    assert [r["step"] for r in m2] == [1, 2, 3, 4]
    assert [r["loss"] for r in m2] == pytest.approx([r["loss"] for r in m1], rel=1e-5)
    assert sorted(p.name for p in two.glob("checkpoint-*")) == ["checkpoint-2"]
    assert not list(two.glob(".checkpoint-*")) and not list(two.glob(".write-test*"))
    # a 2-process checkpoint resumes in one process (same global batch) where the 1-process run went
    resumed = tmp_path / "resumed1"
    shutil.copytree(two / "checkpoint-2", resumed / "checkpoint-2")
    cfg = load_config(
        demo,
        {
            **TINY,
            "output_dir": str(resumed),
            "gradient_accumulation_steps": 2,
            "resume_from_checkpoint": "latest",
        },
    )
    summary = train(cfg, progress=False)
    assert summary["resumed_from"].endswith("checkpoint-2")
    assert max_diff(adapter(one_proc), adapter(resumed)) < TOL


def test_one_process_checkpoint_resumes_on_two_and_gradients_are_all_reduced(
    demo: Path, one_proc: Path, tmp_path: Path
) -> None:
    out = tmp_path / "resumed2"
    shutil.copytree(one_proc / "checkpoint-2", out / "checkpoint-2")
    args = cli_args(
        demo, out, train_batch_size=1, gradient_accumulation_steps=2, resume_from_checkpoint="latest"
    )
    # one launch (imports dominate on CPU): the gradient check, then the CLI train in the same group
    proc = torchrun(2, __file__, "grad-check", str(demo), str(tmp_path / "grad"), *args[2:])
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("GRADCHECK "))
    report = json.loads(line.split(" ", 1)[1])
    print("gradient check:", report)
    assert report["norm"] > 0 and report["diff_to_mean"] < 1e-6 * max(report["norm"], 1.0), report
    assert "resumed from" in proc.stderr
    assert max_diff(adapter(one_proc), adapter(out)) < TOL
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [3, 4]


def test_cancel_stops_every_rank_after_one_step_with_a_checkpoint(demo: Path, tmp_path: Path) -> None:
    """What the TrainLoKr node does with processes > 1: start, stream metrics.jsonl, Cancel."""
    import psutil

    out = tmp_path / "stopped"
    config = tmp_path / "config.json"
    keys = json.loads(demo.read_text())
    keys.update(
        TINY, output_dir=str(out), train_batch_size=1, max_train_steps=100_000, checkpoint_step_interval=None
    )
    config.write_text(json.dumps(keys))
    shutil.copy(demo.parent / "multidatabackend.json", tmp_path)
    shutil.copy(demo.parent / "lycoris_config.json", tmp_path)
    group = TrainingProcesses(config, 2, out)
    group.start()
    seen: list[dict] = []
    deadline = time.monotonic() + 90
    while group.running() and len(seen) < 3 and time.monotonic() < deadline:
        seen += group.new_records()
        time.sleep(0.1)
    assert [r["step"] for r in seen[:3]] == [1, 2, 3], group.log_paths[1].read_text()[-3000:]
    ranks = psutil.Process(group.proc.pid).children(recursive=True)
    assert len([p for p in ranks if "rank_main.py" in " ".join(p.cmdline())]) == 2
    group.stop()
    assert not [p for p in ranks if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    err = group.log_paths[1].read_text()
    assert err.count("interrupted: the last checkpoint is kept") == 2, err[-3000:]  # both ranks stopped
    ckpts = sorted(out.glob("checkpoint-*"))
    assert len(ckpts) == 1 and (ckpts[0] / "complete").is_file()
    step = int(ckpts[0].name.split("-")[1])
    logged = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1] == step >= 3  # the checkpoint is the last logged step: nothing lost, nothing ahead
    state = json.loads((ckpts[0] / "state.json").read_text())
    per_epoch = state["data"]["steps_per_epoch"]
    assert state["step"] == step and state["data"]["position"] == (step - 1) % per_epoch + 1
    with pytest.raises(TrainingError, match="multi-process training failed"):
        group.result()


def grad_check() -> None:
    """Under torchrun: different data per rank; after backward through run.predict (DDP over
    transformer + adapter) every rank's adapter gradients equal the mean of the ranks' local ones."""
    from tunegraph.trainer.training.loop import compute_loss
    from tunegraph.trainer.training.run import prepare_run

    config, out = sys.argv[2], sys.argv[3]
    run = prepare_run(load_config(config, {**TINY, "output_dir": out, "train_batch_size": 1}))
    assert run.ddp is not None and run.dist.world_size == 2
    params = run.adapter.parameters()
    batch, rng = run.data.next_batch(), run.generator.get_state()
    with run.grad_sync(last_micro_batch=False):  # no all-reduce: this rank's own gradients
        compute_loss(run, batch).backward()
    local = torch.cat([p.grad.flatten() for p in params])
    run.optimizer.zero_grad(set_to_none=True)
    run.generator.set_state(rng)  # the same noise and sigmas again
    compute_loss(run, batch).backward()
    synced = torch.cat([p.grad.flatten() for p in params])
    gathered = [torch.empty_like(local) for _ in range(2)]
    torch.distributed.all_gather(gathered, local)
    all_synced = [torch.empty_like(synced) for _ in range(2)]
    torch.distributed.all_gather(all_synced, synced)
    if run.dist.is_main:
        mean = (gathered[0] + gathered[1]) / 2
        assert not torch.allclose(gathered[0], gathered[1])  # the ranks saw different data
        assert torch.equal(all_synced[0], all_synced[1])
        report = {"diff_to_mean": (synced - mean).abs().max().item(), "norm": mean.norm().item()}
        print("GRADCHECK " + json.dumps(report), flush=True)
    torch.distributed.barrier()  # the group stays up for the CLI run that follows in these processes


if __name__ == "__main__" and sys.argv[1:2] == ["grad-check"]:
    from tunegraph.trainer.cli import main

    grad_check()
    sys.exit(main(sys.argv[4:]))
