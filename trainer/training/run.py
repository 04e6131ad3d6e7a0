"""A training run's state (model, data, adapter, optimizer, RNG) and its checkpoint / final files."""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..adapters import attach_adapter
from ..adapters.files import run_metadata
from ..cache.build import build_training_data
from ..errors import TrainingError
from ..models.prepare import prepare_model
from ..plan.check import check_memory
from ..plan.offload import apply_group_offload
from ..plan.presets import apply_memory_preset, memory_settings
from ..preflight import preflight
from ..quantize import module_precision, quantize_model
from .checkpoint import load_checkpoint, resolve_resume, save_checkpoint
from .checkpointing import enable_checkpointing
from .distributed import Dist, setup, wrap_for_ddp
from .ema import EMA
from .optim import build_optimizer, build_scheduler, clip_gradients
from .phases import TrainingView, training_view
from .resume_rules import apply_config, check_resume, config_record, optimizer_settings
from .rng import capture_rng_state, make_generator, restore_rng_state, seed_everything

log = logging.getLogger("tunegraph")

FINAL_NAME = "pytorch_lora_weights.safetensors"


@dataclass
class Run:
    cfg: Any
    model: Any
    data: Any
    adapter: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    ema: EMA | None
    generator: torch.Generator
    output_dir: Path
    total_steps: int
    shift: float | None
    step: int = 0
    start_step: int = 0
    resumed_from: Path | None = None
    validation_images: list[str] = field(default_factory=list)
    dist: Dist = field(default_factory=Dist)
    ddp: Any = None  # DistributedDataParallel(transformer + adapter) when dist.enabled
    stop: bool = False  # every rank agreed to stop after this step (a signal reached one of them)
    view: TrainingView | None = None  # memory by phase (phases.py); close() gives a lent model back

    def close(self) -> None:
        if self.view is not None:
            self.view.close()

    @property
    def device(self) -> torch.device:
        return torch.device(self.model.device)

    def predict(self, xt, sigmas, embeds, guidance) -> torch.Tensor:
        """The family's predict(), through DDP when several processes train (gradients all-reduced)."""
        if self.ddp is not None:
            return self.ddp(xt, sigmas, embeds, guidance)
        return self.model.predict(xt, sigmas, embeds, guidance)

    def grad_sync(self, last_micro_batch: bool):
        """DDP all-reduces on the last micro-batch of an accumulated step only."""
        if self.ddp is None or last_micro_batch:
            return contextlib.nullcontext()
        return self.ddp.no_sync()

    def mark_step_start(self) -> None:
        """Remember the data position and RNG before a step, so an interrupt mid-step can rewind."""
        self._step_start = (self.data.state_dict(), self.generator.get_state())

    def end_step(self) -> None:
        """Count a finished optimizer step; an interrupt raised after it (on_step) must not rewind it."""
        self.step += 1
        self._step_start = None

    def rewind_partial_step(self) -> None:
        """Undo a half-done optimizer step's draws (grads dropped) so a checkpoint sits on a boundary."""
        if getattr(self, "_step_start", None) is not None:
            data_state, gen_state = self._step_start
            self.data.load_state_dict(data_state)
            self.generator.set_state(gen_state)
        self.optimizer.zero_grad(set_to_none=True)

    def clip_gradients(self) -> float:
        return clip_gradients(self.adapter.parameters(), self.cfg.max_grad_norm, self.cfg.grad_clip_method)

    def ema_weights(self):
        """Context in which the adapter holds its EMA weights (a no-op without EMA)."""
        return self.ema.swapped_in(self.adapter) if self.ema is not None else contextlib.nullcontext()

    def validate(self, step: int) -> list[str]:
        from .validation import render_validation

        with self.ema_weights():
            paths = render_validation(self.cfg, self.model, self.output_dir, step, self.data.instance_prompt)
        self.validation_images.extend(str(p) for p in paths)
        return [str(p) for p in paths]


def _check_writable(output_dir: Path) -> None:
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f".write-test-{os.getpid()}"  # one per process: ranks probe at once
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise TrainingError(
            f"output_dir {output_dir} cannot be written ({e.strerror}); choose another folder"
        ) from None


def _total_steps(cfg, steps_per_epoch: int) -> int:
    if cfg.max_train_steps:
        return int(cfg.max_train_steps)
    per_epoch = math.ceil(steps_per_epoch / cfg.gradient_accumulation_steps)
    return max(1, (cfg.num_train_epochs or 1) * per_epoch)


def prepare_run(cfg, model=None, data=None) -> Run:
    """Load (or take) the model, build caches and data (or take a ready sampler: the benchmark's
    synthetic batch), attach the adapter, resume if asked.
    Under torchrun / accelerate launch, joins the process group (see distributed.py)."""
    cfg = apply_memory_preset(cfg)  # memory_preset: precision, checkpointing, offload by card size
    dist = setup()
    if dist.enabled and model is not None:
        raise TrainingError("a preloaded model cannot be shared by several processes; let each rank load it")
    output_dir = Path(cfg.output_dir)
    _check_writable(output_dir)
    resume_path = resolve_resume(output_dir, cfg.resume_from_checkpoint)
    check_resume(resume_path, cfg)  # a changed model/adapter/data key fails here, before loading
    seed_everything(cfg.seed)
    check_memory(cfg, dist.device)  # the memory plan, before anything heavy loads (trainer/plan/)
    owned = model is None
    # issue 15: what the config alone decides fails before any weight is loaded (a given model: by
    # its own shape, before caching and wrapping)
    preflight(cfg, model=model, datasets=data is None)
    if owned:
        model = prepare_model(cfg, dist.device)
    else:  # a model given (a node's, the bench's): quantised as cfg says if not yet (idempotent)
        quantize_model(model, cfg)
    if data is None:
        with dist.main_first():  # rank 0 writes the caches, the others then find them
            data = build_training_data(cfg, model, progress=dist.is_main)
    if dist.enabled:
        data.shard(dist.rank, dist.world_size)
    enable_checkpointing(model.transformer, cfg)
    adapter = attach_adapter(model.transformer, cfg, model)
    apply_group_offload(model.transformer, cfg, dist.device)
    optimizer = build_optimizer(cfg, adapter.parameters())
    total = _total_steps(cfg, len(data))
    cached = getattr(data, "cached", None)  # the text-embed cache answers for training captions
    view = training_view(
        cfg,
        model,
        getattr(data, "instance_prompt", None),
        owned=owned,
        text_paths=getattr(cached, "text_paths", None),
    )
    model = view.model  # an owned model's text encoders lose their last reference here
    gc.collect()
    run = Run(
        cfg=cfg,
        model=model,
        data=data,
        adapter=adapter,
        optimizer=optimizer,
        scheduler=build_scheduler(cfg, optimizer, total),
        ema=EMA(adapter.parameters(), cfg.ema_decay) if cfg.use_ema else None,
        generator=make_generator(cfg.seed),
        output_dir=output_dir,
        total_steps=total,
        shift=None if cfg.flow_schedule_auto_shift else (cfg.flow_schedule_shift or model.default_shift),
        dist=dist,
        view=view,
    )
    try:
        _finish_setup(run, resume_path)
    except BaseException:
        run.close()
        raise
    return run


def _finish_setup(run: Run, resume_path: Path | None) -> None:
    cfg, dist, data = run.cfg, run.dist, run.data
    if resume_path is not None:
        _resume(run, resume_path)
    if dist.enabled:
        run.ddp = wrap_for_ddp(run.model, run.adapter, dist)
        log.info(
            "rank %d of %d on %s: global batch %d = %d per process x %d processes x %d accumulation",
            dist.rank,
            dist.world_size,
            dist.device,
            data.global_batch_size * cfg.gradient_accumulation_steps,
            data.batch_size,
            dist.world_size,
            cfg.gradient_accumulation_steps,
        )


def _metadata(run: Run) -> dict[str, str]:
    """Run facts for adapter files; base_precision is read from the transformer actually trained."""
    return run_metadata(run.cfg, run.step, base_precision=module_precision(run.model.transformer))


def save_run_checkpoint(run: Run, *, barrier: bool = True) -> Path:
    """Write checkpoint-<step>: adapter, optimizer, scheduler, EMA, RNG, data position. With several
    processes (all identical) rank 0 writes it and the others wait for it, unless `barrier` is off
    (an interrupt, where peers may be gone)."""
    if not run.dist.is_main:
        if barrier:
            run.dist.barrier()
        return run.output_dir / f"checkpoint-{run.step}"
    tensors = {"adapter.safetensors": run.adapter.state_dict()}
    if run.ema is not None:
        tensors["ema.safetensors"] = run.ema.state_dict()
    state = {
        "step": run.step,
        "data": run.data.state_dict(),
        "config_hash": run.cfg.config_hash(),
        "config": config_record(run.cfg),  # resume_rules compares it key by key
        "adapter_meta": {**_metadata(run), **run.adapter.file_metadata()},
    }
    path = save_checkpoint(
        run.output_dir,
        run.step,
        tensors=tensors,
        objects={
            "optimizer.pt": run.optimizer.state_dict(),
            "scheduler.pt": run.scheduler.state_dict(),
            "rng.pt": capture_rng_state({"train": run.generator}),
        },
        json={"state.json": state},
        total_limit=run.cfg.checkpoints_total_limit,
    )
    log.info("saved %s", path)
    if barrier:
        run.dist.barrier()
    return path


def _resume(run: Run, path: Path) -> None:
    ckpt = load_checkpoint(path)
    state = ckpt.json["state.json"]
    run.adapter.load_state_dict(ckpt.tensors["adapter.safetensors"])
    settings = optimizer_settings(run.optimizer)  # the config's, before the checkpoint's replace them
    run.optimizer.load_state_dict(ckpt.objects["optimizer.pt"])
    run.scheduler.load_state_dict(ckpt.objects["scheduler.pt"])
    if run.ema is not None and "ema.safetensors" in ckpt.tensors:
        run.ema.load_state_dict(ckpt.tensors["ema.safetensors"])
    restore_rng_state(ckpt.objects["rng.pt"], {"train": run.generator})
    run.data.load_state_dict(state["data"])
    run.step = run.start_step = int(state["step"])
    run.resumed_from = path
    apply_config(run, settings, has_ema_state="ema.safetensors" in ckpt.tensors)  # allowed changes count
    log.info("resumed from %s at step %d", path, run.step)


def save_final(run: Run) -> dict[str, Any]:
    """Write the final adapter (and its EMA twin), a last validation and the loss plot."""
    from .metrics import read_metrics
    from .plot import plot_loss

    if not run.dist.is_main:  # rank 0 writes the files; every rank holds the same adapter
        return {"output_dir": str(run.output_dir), "steps": run.step, "rank": run.dist.rank}
    meta = _metadata(run)
    adapter_path = run.adapter.save(run.output_dir / FINAL_NAME, meta)
    summary: dict[str, Any] = {
        "output_dir": str(run.output_dir),
        "adapter": str(adapter_path),
        "steps": run.step,
        "memory": memory_settings(run.cfg),
    }
    if run.ema is not None:
        with run.ema_weights():
            ema_path = run.adapter.save(run.output_dir / "ema" / FINAL_NAME, {**meta, "ema": "true"})
        summary["ema_adapter"] = str(ema_path)
    done = any(f"step-{run.step:06d}" in p for p in run.validation_images)
    if run.cfg.validation_prompt and not run.cfg.disable_validation and not done:
        run.validate(run.step)
    metrics = read_metrics(run.output_dir / "metrics.jsonl")
    summary["loss_plot"] = str(plot_loss(metrics, run.output_dir / "loss.png"))
    losses = [m["loss"] for m in metrics if "loss" in m]
    summary.update(
        final_loss=losses[-1] if losses else None,
        resumed_from=str(run.resumed_from) if run.resumed_from else None,
        validation_images=run.validation_images,
    )
    return summary
