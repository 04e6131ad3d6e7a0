"""TrainLoKr: the trainer's loop inside ComfyUI, with progress, Cancel -> checkpoint, and resume."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from comfy_api.latest import io, ui
from PIL import Image

from ..trainer.adapters.lycoris_config import read_lycoris_config
from ..trainer.training.checkpoint import find_latest_checkpoint, list_checkpoints
from ..trainer.training.distributed import TrainingProcesses
from ..trainer.training.loop import train
from ..trainer.training.optim import OPTIMIZERS
from ..trainer.training.run_lock import hold_output_dir
from . import paths
from .adapter_scope import clean_transformer
from .handles import AdapterHandle, CacheHandle
from .memory_widgets import memory_inputs, memory_keys, preset_settings
from .run_config import backend_entries, cache_config, claim_run, finished_adapter, load_run_config
from .run_control import CONTROL, RUN_EVENT, apply_requests, web_run_id
from .runtime import TRAIN_EVENT, Progress, autograd_on, check_interrupt, free_comfy_models, interrupt_types
from .sockets import CATEGORY, AdapterSocket, CacheSocket

SCHEDULERS = ["constant", "constant_with_warmup", "cosine", "polynomial"]
TARGETS = {"attention": ["Attention"], "attention+feedforward": ["Attention", "FeedForward"]}


def lycoris_from_widgets(factor: int, full_matrix: bool, linear_dim: int, target: str) -> dict[str, Any]:
    """SimpleTuner's recommended LoKr: full matrix, factor 16, alpha 1, attention modules."""
    return {
        "algo": "lokr",
        "multiplier": 1.0,
        "linear_dim": linear_dim,
        "linear_alpha": 1,
        "factor": factor,
        "full_matrix": full_matrix,
        "apply_preset": {"target_module": TARGETS[target]},
    }


def training_keys(v: dict[str, Any]) -> dict[str, Any]:
    """Widget values -> SimpleTuner config keys (0 means "off / family default" where it says so)."""
    return {
        "model_type": "lora",
        "lora_type": "lycoris",
        "max_train_steps": v["steps"],
        "learning_rate": v["learning_rate"],
        "optimizer": v["optimizer"],
        "lr_scheduler": v["lr_scheduler"],
        "lr_warmup_steps": v["lr_warmup_steps"],
        "train_batch_size": v["train_batch_size"],
        "gradient_accumulation_steps": v["gradient_accumulation_steps"],
        "flow_schedule_shift": v["flow_schedule_shift"] or None,
        "flux_guidance_value": v["flux_guidance_value"],
        "checkpoint_step_interval": v["checkpoint_interval"] or None,
        "eval_steps_interval": v["eval_interval"] or None,
        "eval_timesteps": 8,  # fixed sigmas per eval item: enough for a steady curve, cheap next to training
        "checkpoints_total_limit": 3,
        "use_ema": v["use_ema"],
        "seed": v["seed"],
        "max_grad_norm": v["max_grad_norm"],
        "grad_clip_method": "norm",
        "init_lokr_norm": v["init_lokr_norm"] or None,
        "report_to": "none",
        "resume_from_checkpoint": "latest",  # Cancel, then queue again: continue where it stopped
        **memory_keys(v),
    }


def image_tensor(path: str | Path) -> torch.Tensor:
    """A PNG as ComfyUI's IMAGE: float [1,H,W,3] in [0,1]."""
    arr = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr)[None]


def _start_checkpoint(resume_from: AdapterHandle | None) -> str:
    if resume_from is None or resume_from.output_dir is None:
        return ""
    latest = find_latest_checkpoint(resume_from.output_dir)
    return str(latest) if latest else ""


class TrainLoKr(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TuneGraphTrainLoKr",
            display_name="Train LoKr",
            category=CATEGORY,
            description="Train a LyCORIS LoKr adapter on cached datasets into output/tunegraph/<output_name>. "
            "Cancel saves a checkpoint; queueing again continues from it; an unchanged finished run is reused.",
            is_output_node=True,
            inputs=[
                CacheSocket.Input("cache"),
                io.String.Input("output_name", default="lokr"),
                io.Int.Input("steps", default=1000, min=1, max=1_000_000),
                io.Float.Input("learning_rate", default=1e-3, min=1e-8, max=1.0, step=1e-5, round=False),
                io.Combo.Input("optimizer", options=list(OPTIMIZERS), default="adamw_bf16"),
                io.Combo.Input("lr_scheduler", options=SCHEDULERS, default="constant_with_warmup"),
                io.Int.Input("lr_warmup_steps", default=0, min=0, max=100_000),
                io.Int.Input("train_batch_size", default=1, min=1, max=256),
                io.Int.Input("gradient_accumulation_steps", default=1, min=1, max=1024),
                io.Float.Input(
                    "flow_schedule_shift",
                    default=0.0,
                    min=0.0,
                    max=20.0,
                    step=0.1,
                    tooltip="0 = the family's default shift",
                ),
                io.Float.Input("flux_guidance_value", default=1.0, min=0.0, max=20.0, step=0.1),
                io.Int.Input("checkpoint_interval", default=250, min=0, max=1_000_000, tooltip="0 = off"),
                io.Int.Input(
                    "eval_interval",
                    default=0,
                    min=0,
                    max=1_000_000,
                    tooltip="stable eval loss every N steps; 0 = off",
                ),
                io.Boolean.Input("use_ema", default=False),
                io.Int.Input("seed", default=42, min=0, max=2**31 - 1, control_after_generate=True),
                io.Float.Input("max_grad_norm", default=1.0, min=0.0, max=1000.0, step=0.01),
                io.String.Input(
                    "lycoris_config_file", default="", tooltip="a lycoris_config.json instead of the widgets"
                ),
                io.Int.Input("lokr_factor", default=16, min=-1, max=1024),
                io.Boolean.Input("lokr_full_matrix", default=True),
                io.Int.Input("lokr_linear_dim", default=10000, min=1, max=100_000),
                io.Combo.Input("lokr_target", options=list(TARGETS), default="attention"),
                io.Float.Input(
                    "init_lokr_norm",
                    default=0.0,
                    min=0.0,
                    max=1.0,
                    step=1e-4,
                    round=False,
                    tooltip="0 = off; e.g. 1e-4 speeds up LoKr training",
                ),
                AdapterSocket.Input(
                    "resume_from", optional=True, tooltip="continue a previous TrainLoKr run (chunks)"
                ),
                io.Int.Input(
                    "processes",
                    default=1,
                    min=1,
                    max=64,
                    optional=True,
                    tooltip="1 = train inside ComfyUI; N > 1 = N training processes (one per GPU, DDP) "
                    "started beside ComfyUI; global batch = train_batch_size x N x accumulation",
                ),
                *memory_inputs(),
            ],
            outputs=[AdapterSocket.Output(display_name="adapter"), io.Image.Output(display_name="loss_plot")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(
        cls, cache: CacheHandle, output_name: str, resume_from: AdapterHandle | None = None, **v: Any
    ):
        run_dir = paths.run_folder(output_name, "TrainLoKr: output_name")
        with hold_output_dir(run_dir, "ComfyUI TrainLoKr", choose="output_name"):  # one run per folder
            return cls._run(cache, run_dir, resume_from, v)

    @classmethod
    def _run(cls, cache: CacheHandle, run_dir: Path, resume_from: AdapterHandle | None, v: dict[str, Any]):
        if v["lycoris_config_file"].strip():
            path = paths.input_path(v["lycoris_config_file"], "TrainLoKr: lycoris_config_file")
            lycoris = read_lycoris_config(path)
        else:
            lycoris = lycoris_from_widgets(
                v["lokr_factor"], v["lokr_full_matrix"], v["lokr_linear_dim"], v["lokr_target"]
            )
        config = cache_config(
            cache, run_dir, {**training_keys(v), "cache_dir": str(paths.output_dir() / "tunegraph" / "cache")}
        )
        for entry in cache.datasets.entries:  # files added since CacheLatents count too
            paths.check_dataset_files(entry["instance_data_dir"], f"TrainLoKr: dataset '{entry['id']}'")
        start = _start_checkpoint(resume_from)
        config_path, identity, mode = claim_run(
            run_dir,
            config,
            backend_entries(cache.datasets, cache.text_cache_dir),
            lycoris,
            # the process count changes the global batch, so it is part of what the run is
            f"{start}|{cache.model.fingerprint}"
            + (f"|processes={v['processes']}" if v.get("processes", 1) > 1 else ""),
        )
        done = finished_adapter(run_dir, identity, v["steps"])
        if done is not None:  # the same run finished before (e.g. after a server restart): reuse it
            summary = {"adapter": str(done), "output_dir": str(run_dir), "steps": v["steps"], "reused": True,
                       "loss_plot": str(run_dir / "loss.png")}  # fmt: skip
        else:
            if (
                mode == "fresh" and start
            ):  # a chunk starts from a copy of the previous chunk's last checkpoint
                shutil.copytree(start, run_dir / Path(start).name, dirs_exist_ok=True)
            cfg = load_run_config(config_path)
            processes = int(v.get("processes") or 1)
            if processes > 1:
                summary = cls._train_processes(cfg, config_path, run_dir, processes)
            else:
                summary = cls._train(cfg, cache, run_dir)
        return cls._outputs(cache, summary)

    @classmethod
    def _train(cls, cfg, cache: CacheHandle, run_dir: Path) -> dict[str, Any]:
        progress = Progress(cfg.max_train_steps, cls.hidden.unique_id)
        run_id = web_run_id(run_dir)
        cfg, memory = preset_settings(cfg)  # the plan's picks, shown by the live panel
        event = {"run": str(run_dir), "run_id": run_id, "memory": memory}
        samples = int(cfg.train_batch_size) * int(cfg.gradient_accumulation_steps)

        def on_step(step: int, total: int, record: dict[str, Any]) -> None:
            progress.update(step, total, text=f"step {step}/{total}  loss {record['loss']:.4f}")
            keys = ("loss", "lr", "grad_norm", "eval_loss", "seconds")
            metrics = {k: float(record[k]) for k in keys if record.get(k) is not None}
            progress.send(TRAIN_EVENT, {**event, "step": step, "total": total, "samples": samples, **metrics})
            check_interrupt()

        def control(run) -> bool:  # the web panel's buttons, between steps
            send = lambda data: progress.send(RUN_EVENT, {**event, "total": run.total_steps, **data})  # noqa: E731
            return apply_requests(run, CONTROL.take(run_id), send)

        free_comfy_models()
        bundle = cache.model.bundle
        running = CONTROL.running(
            run_id, node=cls.hidden.unique_id, run=str(run_dir), total=cfg.max_train_steps
        )
        with autograd_on(), clean_transformer(bundle.transformer), running:
            # final_checkpoint: a later chunk's `resume_from` continues from this run's last step
            summary = train(
                cfg,
                model=bundle,
                on_step=on_step,
                interrupt_types=interrupt_types(),
                progress=False,
                final_checkpoint=True,
                control=control,
            )
        progress.send(RUN_EVENT, {**event, "action": "finished", "step": summary["steps"]})
        return summary

    @classmethod
    def _train_processes(cls, cfg, config_path: Path, run_dir: Path, processes: int) -> dict[str, Any]:
        """processes > 1: torchrun runs the trainer CLI on this run's config.json (never a second
        ComfyUI); progress comes from its metrics.jsonl, Cancel stops every rank after a checkpoint."""
        progress = Progress(cfg.max_train_steps, cls.hidden.unique_id)
        samples = int(cfg.train_batch_size) * int(cfg.gradient_accumulation_steps) * processes  # global batch
        event = {
            "run": str(run_dir),
            "run_id": web_run_id(run_dir),
            "processes": processes,
            "samples": samples,
        }
        free_comfy_models()
        done = list_checkpoints(run_dir)  # the config resumes from the latest one
        group = TrainingProcesses(config_path, processes, run_dir, resume_step=done[-1][0] if done else 0)
        group.start()
        try:
            while True:
                done = not group.running()
                for r in group.new_records():
                    step, total = int(r["step"]), cfg.max_train_steps
                    progress.update(
                        step, total, text=f"step {step}/{total}  loss {r['loss']:.4f}  x{processes}"
                    )
                    metrics = {
                        k: float(r[k]) for k in ("loss", "lr", "grad_norm", "seconds") if r.get(k) is not None
                    }
                    progress.send(TRAIN_EVENT, {**event, "step": step, "total": total, **metrics})
                if done:
                    break
                check_interrupt()
                time.sleep(0.25)
        except BaseException:
            group.stop()  # Cancel (or any error here): the ranks checkpoint and exit
            raise
        summary = group.result()
        progress.send(RUN_EVENT, {**event, "action": "finished", "step": summary["steps"]})
        return summary

    @classmethod
    def _outputs(cls, cache: CacheHandle, summary: dict[str, Any]) -> io.NodeOutput:
        model = cache.model
        handle = AdapterHandle(
            path=Path(summary["adapter"]),
            family=model.family,
            flavour=str(model.keys.get("model_flavour") or ""),
            steps=int(summary["steps"]),
            output_dir=Path(summary["output_dir"]),
            summary=json.loads(json.dumps(summary, default=str)),
        )
        plot = Path(summary.get("loss_plot") or "")
        image = image_tensor(plot) if plot.is_file() else torch.zeros(1, 64, 64, 3)
        return io.NodeOutput(handle, image, ui=ui.PreviewImage(image, cls=cls))
