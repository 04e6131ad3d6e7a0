"""ValidateSamples: images from the training model (optionally with an adapter), shown on the node."""

from __future__ import annotations

import numpy as np
import torch
from comfy_api.latest import io, ui

from ..trainer.adapters import load_adapter_file
from ..trainer.errors import ConfigError
from ..trainer.training.sampling import sample_images
from .adapter_scope import clean_transformer
from .handles import AdapterHandle, TrainingModel
from .runtime import Progress, check_interrupt
from .sockets import CATEGORY, AdapterSocket, ModelSocket


def pil_to_image(images: list) -> torch.Tensor:
    """PIL images (same size) -> ComfyUI IMAGE [B,H,W,3] float in [0,1]."""
    return torch.from_numpy(
        np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images])
    )


def check_adapter_fits(model: TrainingModel, adapter: AdapterHandle, node: str) -> None:
    if adapter.family and adapter.family != model.family:
        raise ConfigError(
            f"{node}: the adapter {adapter.path.name} was trained for {adapter.family}, the model is {model.family}"
        )


class ValidateSamples(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TuneGraphValidateSamples",
            display_name="Validate Samples",
            category=CATEGORY,
            description="Render prompts (one per line) with the training model and an optional trained adapter, "
            "exactly as the trainer's validation does; real CFG when guidance_real > 1.",
            is_output_node=True,
            inputs=[
                ModelSocket.Input("model"),
                io.String.Input("prompts", multiline=True, default="a photo of a cat"),
                io.String.Input("negative_prompt", default="blurry, cropped, ugly"),
                io.Int.Input("width", default=1024, min=16, max=8192, step=16),
                io.Int.Input("height", default=1024, min=16, max=8192, step=16),
                io.Int.Input("steps", default=30, min=1, max=500),
                io.Float.Input("guidance", default=3.0, min=0.0, max=30.0, step=0.1),
                io.Float.Input("guidance_real", default=1.0, min=1.0, max=30.0, step=0.1),
                io.Int.Input("no_cfg_steps", default=2, min=0, max=500),
                io.Int.Input("seed", default=42, min=0, max=2**31 - 1, control_after_generate=True),
                AdapterSocket.Input("adapter", optional=True),
            ],
            outputs=[io.Image.Output(display_name="images")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model: TrainingModel, prompts: str, negative_prompt: str, adapter: AdapterHandle | None = None,
                **v) -> io.NodeOutput:  # fmt: skip
        lines = [p.strip() for p in prompts.splitlines() if p.strip()]
        if not lines:
            raise ConfigError("ValidateSamples: prompts is empty; write one prompt per line")
        bundle = model.bundle
        progress = Progress(len(lines), cls.hidden.unique_id)
        images = []
        with clean_transformer(bundle.transformer):
            if adapter is not None:
                check_adapter_fits(model, adapter, "ValidateSamples")
                load_adapter_file(adapter.path, bundle.transformer)
            for i, prompt in enumerate(lines):
                check_interrupt()
                out, _ = sample_images(
                    bundle, [prompt], negative_prompt or None, width=v["width"], height=v["height"],
                    steps=v["steps"], guidance=v["guidance"], seed=v["seed"],
                    guidance_real=v["guidance_real"], no_cfg_steps=v["no_cfg_steps"],
                )  # fmt: skip
                images.extend(out)
                progress.update(i + 1)
        batch = pil_to_image(images)
        return io.NodeOutput(batch, ui=ui.PreviewImage(batch, cls=cls))
