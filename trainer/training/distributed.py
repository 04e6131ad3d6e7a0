"""Multi-process (DDP) training: `torchrun --nproc_per_node N -m tunegraph.trainer.cli train --config C`.

One process per device. Every rank holds the whole frozen transformer and the same adapter; DDP wraps
the transformer and the adapter network as ONE module (DDP over the network alone never syncs its
gradients: the forward that builds the graph would not go through DDP). Gradients are averaged across
ranks, so every rank takes the same optimizer step and all ranks stay identical, which is why rank 0
alone writes checkpoints, metrics and validation images, and why any process count can resume them.

Global batch = train_batch_size x processes x gradient_accumulation_steps. The data plan is made for
the global micro-batch and each rank takes its own slice (see TrainingData.shard); noise and sigmas
are drawn for the global micro-batch from the shared seeded generator and sliced the same way, so 2
processes x batch 1 train the same adapter as 1 process x batch 2.

A SIGTERM/SIGINT during the loop (torchrun forwards them to every rank; the ComfyUI node sends one on
Cancel) only sets a flag; ranks agree on it in the per-step all-reduce and stop together after the
same step, where rank 0 writes a checkpoint.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist

from ..errors import TrainingError

log = logging.getLogger("tunegraph")

# A rank waits in a collective while rank 0 alone validates or checkpoints: allow slow validations.
TIMEOUT = datetime.timedelta(minutes=int(os.environ.get("TUNEGRAPH_DIST_TIMEOUT_MIN", "60")))


@dataclass(frozen=True)
class Dist:
    """This process's place in the process group; the default is a single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            tdist.barrier()

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (e.g. builds the shared caches), the others after it."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    def step_sync(self, loss: float, stop: bool) -> tuple[float, bool]:
        """Mean loss over ranks and whether any rank was asked to stop, in one all-reduce."""
        if not self.enabled:
            return loss, stop
        t = torch.tensor([loss, float(stop)], dtype=torch.float64, device=self.device)
        tdist.all_reduce(t)
        return t[0].item() / self.world_size, t[1].item() > 0

    def shard_rows(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a tensor drawn for the global micro-batch (all of it for one process)."""
        if not self.enabled:
            return t
        n = t.shape[0] // self.world_size
        return t[self.rank * n : (self.rank + 1) * n]


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        raise TrainingError(f"environment variable {name}={os.environ[name]!r} is not an integer") from None


def setup() -> Dist:
    """The process group torchrun / accelerate launch describe in the environment (WORLD_SIZE, RANK,
    LOCAL_RANK, MASTER_ADDR/PORT); initialised once, gloo on CPU and nccl on CUDA. A plain
    `tunegraph train` gets the single-process Dist."""
    world = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    cuda = torch.cuda.is_available()
    if cuda and world > 1:
        torch.cuda.set_device(local_rank)
    device = torch.device(f"cuda:{local_rank}" if cuda and world > 1 else ("cuda" if cuda else "cpu"))
    if world <= 1:
        return Dist(device=device)
    if not tdist.is_initialized():
        tdist.init_process_group(backend="nccl" if cuda else "gloo", timeout=TIMEOUT)
    return Dist(tdist.get_rank(), tdist.get_world_size(), local_rank, device)


def teardown() -> None:
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


class TrainingModule(torch.nn.Module):
    """The transformer and the adapter network as one module, its forward the family's predict()."""

    def __init__(self, model: Any, adapter: Any):
        super().__init__()
        self.transformer = model.transformer
        network = getattr(adapter, "network", None)  # LyCORIS; PEFT's layers live in the transformer
        if network is not None:
            self.network = network
        object.__setattr__(self, "family_model", model)  # not a submodule: it is not an nn.Module

    def forward(self, xt, sigmas, embeds, guidance):
        return self.family_model.predict(xt, sigmas, embeds, guidance)


def wrap_for_ddp(model: Any, adapter: Any, dist: Dist) -> torch.nn.parallel.DistributedDataParallel:
    """DDP over transformer + adapter. Frozen base weights and buffers are left out of DDP's sync:
    every rank loads them identically, and broadcasting a 12B base would only cost time."""
    module = TrainingModule(model, adapter)
    frozen = [n for n, p in module.named_parameters() if not p.requires_grad]
    frozen += [n for n, _ in module.named_buffers()]
    torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, frozen)
    trained = [p for p in module.parameters() if p.requires_grad]
    if not trained:
        raise TrainingError("distributed training: the adapter has no trainable parameters")
    device_ids = [dist.device.index] if dist.device.type == "cuda" else None
    # MoE routing (HiDream) can leave experts' adapters without a gradient in a step.
    unused = getattr(model, "family", "") == "hidream"
    return torch.nn.parallel.DistributedDataParallel(
        module, device_ids=device_ids, find_unused_parameters=unused
    )


# -- graceful stop on SIGTERM / SIGINT ------------------------------------------------------------
_stop = {"requested": False, "armed": False}


def stop_requested() -> bool:
    return _stop["requested"]


@contextlib.contextmanager
def stop_armed() -> Iterator[None]:
    """Inside the training loop a signal only requests a stop at the next step boundary."""
    _stop["armed"] = True
    try:
        yield
    finally:
        _stop["armed"] = False


def _on_signal(signum: int, frame: Any) -> None:
    if _stop["armed"]:
        if not _stop["requested"]:
            log.info("signal %d: stopping after this step (a checkpoint is written)", signum)
        _stop["requested"] = True
        return
    raise KeyboardInterrupt  # outside the loop (loading, caching, final files): stop at once


@contextlib.contextmanager
def graceful_signals() -> Iterator[None]:
    """Install the SIGTERM/SIGINT handlers for a CLI run (main thread only)."""
    old = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    _stop["requested"] = False
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


# -- a training process group started by another program (the TrainLoKr node) --------------------
ENTRY = Path(__file__).with_name("rank_main.py")  # imports this pack as `tunegraph` wherever it lies


def launch_command(config: str | Path, processes: int) -> list[str]:
    """torchrun (as `python -m torch.distributed.run`, so this interpreter) running the CLI train."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={int(processes)}",
        str(ENTRY),
        "train",
        "--config",
        str(config),
        "--json",
        "--final-checkpoint",  # as the in-process node: a later chunk continues from the last step
    ]


class TrainingProcesses:
    """`tunegraph train` on `processes` ranks as child processes (never a second ComfyUI): start it,
    read its metrics.jsonl as it grows, stop it (SIGTERM: every rank stops after the same step and
    rank 0 writes a checkpoint; whatever is still alive after `grace` seconds is killed)."""

    def __init__(self, config: str | Path, processes: int, output_dir: str | Path, resume_step: int = 0):
        self.output_dir = Path(output_dir)
        self.cmd = launch_command(config, processes)
        self.proc: subprocess.Popen | None = None
        self.resume_step = self._seen_step = int(resume_step)

    @property
    def log_paths(self) -> tuple[Path, Path]:
        logs = self.output_dir / "logs"
        return logs / "train.stdout.log", logs / "train.stderr.log"

    def start(self) -> None:
        from .metrics import truncate_metrics
        from .run_lock import launcher_env

        # as the child will on start: lines past the resumed step are not this run's progress
        truncate_metrics(self.output_dir / "metrics.jsonl", self.resume_step)
        out, err = self.log_paths
        out.parent.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
        env.setdefault("OMP_NUM_THREADS", "1")  # torchrun's own default, without its warning
        env.update(launcher_env(self.output_dir))  # rank 0 shares this process's run lock
        with open(out, "w") as fo, open(err, "w") as fe:
            self.proc = subprocess.Popen(
                self.cmd, stdout=fo, stderr=fe, stdin=subprocess.DEVNULL, env=env, start_new_session=True
            )

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def new_records(self) -> list[dict[str, Any]]:
        """Metric records of steps not returned before (metrics.jsonl, written by rank 0)."""
        from .metrics import read_metrics

        records = [r for r in read_metrics(self.output_dir / "metrics.jsonl") if "loss" in r]
        fresh = [r for r in records if int(r["step"]) > self._seen_step]
        if fresh:
            self._seen_step = int(fresh[-1]["step"])
        return fresh

    def result(self) -> dict[str, Any]:
        """The run's summary (the CLI's --json line); a TrainingError with the log tail on failure."""
        out, err = self.log_paths
        code = self.proc.wait() if self.proc is not None else None
        lines = [x for x in out.read_text(errors="replace").splitlines() if x.startswith("{")]
        summary = json.loads(lines[-1]) if lines else {}
        if code != 0 or not lines or "error" in summary:
            tail = "\n".join(err.read_text(errors="replace").splitlines()[-25:])
            why = summary.get("error") or f"exit code {code}"
            raise TrainingError(f"multi-process training failed ({why}); full log in {err}:\n{tail}")
        return summary

    def stop(self, grace: float = 90.0) -> None:
        """Cancel: SIGTERM to torchrun (it forwards it to every rank), then kill what remains."""
        if self.proc is None:
            return
        ranks = _descendants(self.proc.pid)  # ranks run in their own sessions: collect them first
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                log.warning("training processes did not stop within %ss; killing them", grace)
        for pid in [self.proc.pid, *ranks]:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait()


def _descendants(pid: int) -> list[int]:
    try:
        import psutil  # ComfyUI depends on it
    except ImportError:
        return []
    with contextlib.suppress(psutil.Error):
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    return []
