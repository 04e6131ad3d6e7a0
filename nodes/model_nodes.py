"""LoadTrainingModel and QuantizeModel: the trainer's model families as a TUNEGRAPH_MODEL socket."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from comfy_api.latest import io

from ..trainer.choices import PRECISIONS as PRECISION_NAMES
from ..trainer.config import TrainConfig
from ..trainer.errors import ConfigError
from ..trainer.models import FAMILIES
from ..trainer.models.prepare import prepare_model
from ..trainer.quantize import quantize_model
from . import paths
from .comfy_files import FILE_KEYS, comfy_file_inputs, comfy_file_keys
from .handles import TrainingModel
from .runtime import autograd_on, free_comfy_models, torch_device
from .sockets import CATEGORY, ModelSocket

FLAVOURS = sorted({f for fam in FAMILIES.values() for f in fam.flavours})
PRECISIONS = {"bf16": "bf16", "fp32": "no"}  # widget -> mixed_precision
QUANT_PRECISIONS = list(PRECISION_NAMES)


def model_keys(family: str, flavour: str, folder: str, precision: str) -> dict:
    """The config keys naming this model; a folder is confined to the allowed roots."""
    if family not in FAMILIES:
        raise ConfigError(f"LoadTrainingModel: model_family '{family}' is not one of {', '.join(FAMILIES)}")
    FAMILIES[family].check_flavour(flavour, "LoadTrainingModel")
    keys = {"model_family": family, "model_flavour": flavour, "mixed_precision": PRECISIONS[precision]}
    if folder.strip():
        import folder_paths

        base = folder_paths.get_folder_paths("diffusers")[0]
        where = "LoadTrainingModel: diffusers_folder"
        keys["pretrained_model_name_or_path"] = str(paths.confine(folder, base, paths.comfy_roots(), where))
    return keys


def fingerprint(keys: dict, seed: int) -> str:
    """The tiny weights follow the seed; a folder's or a file's weights change when its files do."""
    stamps = []
    for key in ("pretrained_model_name_or_path", *FILE_KEYS):
        if keys.get(key):
            p = Path(keys[key])
            files = p.rglob("*") if p.is_dir() else [p]
            stamps.append(max((f.stat().st_mtime_ns for f in files if f.is_file()), default=0))
    return f"seed={seed};mtimes={stamps}"


class LoadTrainingModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TuneGraphLoadTrainingModel",
            display_name="Load Training Model",
            category=CATEGORY,
            description="Load a model family for training and sampling: the built-in 'tiny' flavour, a "
            "local diffusers folder (relative to models/diffusers), or the ComfyUI files you sample with "
            "(diffusion model, VAE, text encoders in the family's order). Weights are never downloaded.",
            inputs=[
                io.Combo.Input("model_family", options=list(FAMILIES), default="flux"),
                io.Combo.Input("model_flavour", options=FLAVOURS, default="tiny"),
                io.String.Input("diffusers_folder", default="", tooltip="empty for flavour 'tiny'"),
                io.Combo.Input("precision", options=list(PRECISIONS), default="bf16"),
                io.Int.Input(
                    "seed",
                    default=0,
                    min=0,
                    max=2**31 - 1,
                    control_after_generate=True,
                    tooltip="weights of the tiny flavour",
                ),
                *comfy_file_inputs(),
            ],
            outputs=[ModelSocket.Output(display_name="model")],
        )

    @classmethod
    def execute(
        cls, model_family, model_flavour, diffusers_folder, precision, seed, **files
    ) -> io.NodeOutput:
        keys = {
            **model_keys(model_family, model_flavour, diffusers_folder, precision),
            **comfy_file_keys(files),
            "tiny_model_seed": seed,
        }
        cfg = TrainConfig.from_dict(keys, source="LoadTrainingModel")
        if set(keys) & {"pretrained_model_name_or_path", *FILE_KEYS}:
            free_comfy_models()  # ComfyUI's own loaded models give their memory to ours
        with autograd_on():  # weights made under inference_mode could never be trained
            bundle = prepare_model(cfg, torch_device())  # dtype from mixed_precision, as the CLI
        return io.NodeOutput(TrainingModel(bundle, keys, fingerprint(keys, seed)))


class QuantizeModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TuneGraphQuantizeModel",
            display_name="Quantize Model",
            category=CATEGORY,
            description="Quantise the base transformer for low-VRAM training (the adapter trains in LyCORIS "
            "bypass mode on top). Works on a copy, so the loader's cached model stays as loaded; use the "
            "adapter later on a base of the same precision.",
            inputs=[ModelSocket.Input("model"), io.Combo.Input("precision", options=QUANT_PRECISIONS)],
            outputs=[ModelSocket.Output(display_name="model")],
        )

    @classmethod
    def execute(cls, model: TrainingModel, precision: str) -> io.NodeOutput:
        if precision == "no_change":
            return io.NodeOutput(model)
        keys = {**model.keys, "base_model_precision": precision}
        cfg = TrainConfig.from_dict(
            {**keys, "base_model_default_dtype": "fp32" if model.bundle.dtype == torch.float32 else "bf16"},
            source="QuantizeModel",
        )
        with autograd_on():  # a copy made under ComfyUI's inference mode could never be trained
            bundle = copy.deepcopy(model.bundle)  # ComfyUI caches the loader's output: never change it
            quantize_model(bundle, cfg)
        return io.NodeOutput(TrainingModel(bundle, keys, f"{model.fingerprint};{precision}"))
