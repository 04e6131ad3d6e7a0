"""LoadDiffusionModel: a ComfyUI-keyed diffusion-model file whose shape ComfyUI cannot detect (the tiny
models from `tunegraph tiny-models --comfyui DIR`, which carry their unet config in the metadata).
Full-size models load with ComfyUI's own Load Diffusion Model (UNETLoader)."""

from __future__ import annotations

import torch
from comfy_api.latest import io

from .comfy_model import load_comfy_unet
from .sockets import CATEGORY

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class LoadDiffusionModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        import folder_paths

        return io.Schema(
            node_id="TuneGraphLoadDiffusionModel",
            display_name="Load Diffusion Model (explicit shape)",
            category=CATEGORY,
            description="A stock Flux / HiDream MODEL from a models/diffusion_models file written by "
            "`tunegraph tiny-models --comfyui`: the shape comes from the file's metadata, not from "
            "ComfyUI's full-size detection. Use ComfyUI's Load Diffusion Model for downloaded models.",
            inputs=[
                io.Combo.Input("unet_name", options=folder_paths.get_filename_list("diffusion_models")),
                io.Combo.Input("weight_dtype", options=list(DTYPES), default="fp32"),
            ],
            outputs=[io.Model.Output(display_name="MODEL")],
        )

    @classmethod
    def execute(cls, unet_name: str, weight_dtype: str) -> io.NodeOutput:
        import folder_paths

        path = folder_paths.get_full_path_or_raise("diffusion_models", unet_name)
        return io.NodeOutput(load_comfy_unet(path, DTYPES[weight_dtype]))
