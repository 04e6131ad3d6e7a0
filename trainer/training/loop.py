"""The training loop: one readable path from config to loss, nanoGPT-style.

`train(cfg)` is what the CLI and the TrainLoKr node both call. All randomness of a step comes from
the run's own generator (saved in checkpoints) and the data order from the sampler's state, so a
run stopped at step N and resumed reproduces an uninterrupted run bit for bit on CPU.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..errors import TrainingError
from .distributed import stop_armed, stop_requested
from .evaluate import EvalSet
from .flow import flow_loss, flow_target, image_seq_len, noisy_latents, sample_sigmas
from .metrics import MetricsWriter, TrainProgress
from .regularisation import parent_targets, regularisation_rows
from .run import Run, prepare_run, save_final, save_run_checkpoint
from .run_lock import hold_output_dir

log = logging.getLogger("tunegraph")

StepCallback = Callable[[int, int, dict[str, Any]], None]
ControlCallback = Callable[[Run], bool]  # runs between steps with the Run; True stops (after a checkpoint)


def _autocast(run: Run):
    if run.cfg.mixed_precision == "bf16" and run.model.dtype != torch.float32:
        return torch.autocast(device_type=run.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def compute_loss(run: Run, batch: dict[str, Any]) -> torch.Tensor:
    """Flow-matching loss for one micro-batch: x_t = (1-s)x0 + s*noise, target noise - x0 (for
    regularisation images: the base model's prediction, see regularisation.py)."""
    cfg, gen, dist = run.cfg, run.generator, run.dist
    x0 = batch["latents"].to(run.device, torch.float32)
    n = x0.shape[0] * dist.world_size  # drawn for the global micro-batch; this rank takes its rows
    noise = dist.shard_rows(torch.randn((n, *x0.shape[1:]), generator=gen, dtype=torch.float32)).to(
        run.device
    )
    sigmas = sample_sigmas(
        n,
        gen,
        method="uniform" if cfg.flow_use_uniform_schedule else "sigmoid",
        sigmoid_scale=cfg.flow_sigmoid_scale,
        shift=run.shift,
        auto_shift=cfg.flow_schedule_auto_shift,
        image_seq_len=image_seq_len(x0.shape[-2], x0.shape[-1]),
    )
    sigmas = dist.shard_rows(sigmas).to(run.device)
    xt = noisy_latents(x0, noise, sigmas).to(run.model.dtype)
    guidance = torch.full((x0.shape[0],), float(cfg.flux_guidance_value), device=run.device)
    embeds = {k: v.to(run.device, run.model.dtype) for k, v in batch["embeds"].items()}
    target = flow_target(x0, noise)
    if (rows := regularisation_rows(batch, run.device)) is not None:  # before the student's aux loss
        parent = lambda: run.model.predict(xt, sigmas, embeds, guidance)  # noqa: E731
        target = parent_targets(run.adapter, parent, target, rows, _autocast(run))
    with _autocast(run):
        pred = run.predict(xt, sigmas, embeds, guidance)
    loss = flow_loss(pred.float(), target, sigmas, cfg.loss_type, cfg.huber_c, cfg.huber_schedule)
    aux = getattr(run.model, "last_aux_loss", None)  # HiDream's MoE load-balancing loss (with grad)
    if cfg.hidream_use_load_balancing_loss and aux is not None:
        loss = loss + cfg.hidream_load_balancing_loss_weight * aux.float()
    return loss


def optimizer_step(run: Run) -> dict[str, float]:
    """One optimizer step over gradient_accumulation_steps micro-batches."""
    cfg = run.cfg
    accum = cfg.gradient_accumulation_steps
    total = 0.0
    run.mark_step_start()
    for i in range(accum):
        with run.grad_sync(last_micro_batch=i == accum - 1):
            loss = compute_loss(run, run.data.next_batch())
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"loss became {loss.item()} at step {run.step + 1}; stopping. The last good checkpoint is "
                    "kept (lower learning_rate, set max_grad_norm, or check the data)"
                )
            (loss / accum).backward()
        total += loss.item() / accum
    grad_norm = run.clip_gradients()
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    if run.ema is not None:
        run.ema.update()
    run.end_step()
    total, run.stop = run.dist.step_sync(total, stop_requested())  # all ranks stop after the same step
    return {"loss": total, "lr": run.scheduler.get_last_lr()[0], "grad_norm": grad_norm}


def _due(step: int, interval: int | None) -> bool:
    return bool(interval) and step % interval == 0


def _after_step(
    run: Run, record: dict[str, Any], metrics: MetricsWriter, evals: EvalSet, final_checkpoint: bool
) -> None:
    cfg, step = run.cfg, run.step
    if _due(step, cfg.eval_steps_interval) and evals:
        record["eval_loss"] = evals.loss(run)
    metrics.log(step, **record)
    last = step >= run.total_steps
    if (_due(step, cfg.checkpoint_step_interval) and not last) or (last and final_checkpoint):
        save_run_checkpoint(run)
    if _due(step, cfg.validation_step_interval) and not cfg.disable_validation and run.dist.is_main:
        run.validate(step)


def train(cfg, **options: Any) -> dict[str, Any]:
    """Train as `cfg` says (options: see `_train`), holding the output folder's run lock throughout:
    a second run on the same folder stops at once (run_lock.py)."""
    with hold_output_dir(cfg.output_dir):
        return _train(cfg, **options)


def _train(
    cfg,
    *,
    model=None,
    on_step: StepCallback | None = None,
    interrupt_types: tuple[type[BaseException], ...] = (KeyboardInterrupt,),
    progress: bool | None = None,
    final_checkpoint: bool = False,
    control: ControlCallback | None = None,
) -> dict[str, Any]:
    """Train an adapter as `cfg` says; returns a summary. `on_step(step, total, record)` runs after
    every optimizer step (the nodes' progress bar). An exception of `interrupt_types` (Cancel) saves
    a checkpoint at the last finished step, then re-raises. `final_checkpoint` also checkpoints the
    last step (SimpleTuner writes only the final adapter there), so a later chunk can continue.
    `control(run)` runs after on_step (the web panel's requests: checkpoint, validate); when it
    returns True training stops early: a checkpoint at that step, then the final files as usual."""
    run = prepare_run(cfg, model=model)
    try:
        return _train_run(run, on_step, interrupt_types, progress, final_checkpoint, control)
    finally:
        run.close()  # a lent model gets its text encoders and VAE back where they were


def _train_run(
    run: Run,
    on_step: StepCallback | None,
    interrupt_types: tuple[type[BaseException], ...],
    progress: bool | None,
    final_checkpoint: bool,
    control: ControlCallback | None,
) -> dict[str, Any]:
    cfg = run.cfg
    main = run.dist.is_main  # with several processes, rank 0 alone evaluates, logs and writes files
    evals = EvalSet.build(run) if main else EvalSet()
    started = time.monotonic()
    with MetricsWriter(
        run.output_dir,
        cfg.report_to,
        cfg.tracker_run_name,
        resume_step=run.step,
        enabled=main,
        logging_dir=cfg.logging_dir,
        project=cfg.tracker_project_name,
    ) as metrics:
        first_eval = None
        if evals and run.step == run.start_step:
            first_eval = evals.loss(run)
            metrics.log(run.step, eval_loss=first_eval)
        with (
            TrainProgress(run.total_steps, run.step, enabled=progress if main else False) as bar,
            stop_armed(),
        ):
            try:
                while run.step < run.total_steps:
                    t0 = time.monotonic()
                    record = optimizer_step(run)
                    record["seconds"] = time.monotonic() - t0
                    record["epoch"] = run.data.epoch
                    _after_step(run, record, metrics, evals, final_checkpoint)
                    bar.update(loss=record["loss"], lr=record["lr"])
                    if on_step is not None:
                        on_step(run.step, run.total_steps, record)
                    if control is not None and control(run) and run.step < run.total_steps:
                        save_run_checkpoint(run)
                        break
                    if run.stop and run.step < run.total_steps:  # SIGTERM/SIGINT to the CLI (distributed.py)
                        raise KeyboardInterrupt
            except interrupt_types:
                run.rewind_partial_step()
                if run.step > run.start_step:
                    bar.write(f"interrupted: saving checkpoint at step {run.step}")
                    save_run_checkpoint(run, barrier=False)
                raise
        last_eval = evals.loss(run) if evals else None
        if last_eval is not None and run.step % (cfg.eval_steps_interval or math.inf) != 0:
            metrics.log(run.step, eval_loss=last_eval)
    summary = save_final(run)
    run.dist.barrier()
    summary.update(
        seconds=round(time.monotonic() - started, 3),
        eval_loss_first=first_eval,
        eval_loss_last=last_eval,
        metrics=str(Path(run.output_dir) / "metrics.jsonl"),
        cache=getattr(getattr(run.data, "cached", None), "summary", None),  # cached / reused counts
    )
    return summary
