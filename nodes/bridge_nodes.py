"""From the trainer's model to ComfyUI's own types, so stock samplers run on tiny (or any) Flux shapes
with one model load: ToComfyModel (MODEL), EncodePrompt (CONDITIONING), DecodeLatents (IMAGE)."""

from __future__ import annotations

from comfy_api.latest import io

from .comfy_model import decode_comfy_latents, to_comfy_model, to_conditioning
from .handles import TrainingModel
from .sockets import CATEGORY, ModelSocket


class ToComfyModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TuneGraphToComfyModel",
            display_name="To ComfyUI Model",
            category=CATEGORY,
            description="The training model's transformer as a ComfyUI MODEL (a copy, with its exact shape), "
            "for KSampler / SamplerCustomAdvanced and ComfyUI's LoRA loaders.",
            inputs=[ModelSocket.Input("model")],
            outputs=[io.Model.Output(display_name="MODEL")],
        )

    @classmethod
    def execute(cls, model: TrainingModel) -> io.NodeOutput:
        return io.NodeOutput(to_comfy_model(model.bundle))


class EncodePrompt(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TuneGraphEncodePrompt",
            display_name="Encode Prompt (TuneGraph)",
            category=CATEGORY,
            description="CONDITIONING from the training model's own text encoders, with Flux's guidance value.",
            inputs=[
                ModelSocket.Input("model"),
                io.String.Input("text", multiline=True, default=""),
                io.Float.Input("guidance", default=3.5, min=0.0, max=100.0, step=0.1),
            ],
            outputs=[io.Conditioning.Output(display_name="CONDITIONING")],
        )

    @classmethod
    def execute(cls, model: TrainingModel, text: str, guidance: float) -> io.NodeOutput:
        return io.NodeOutput(to_conditioning(model.bundle, text, guidance))


class DecodeLatents(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TuneGraphDecodeLatents",
            display_name="Decode Latents (TuneGraph)",
            category=CATEGORY,
            description="Decode a ComfyUI LATENT with the training model's own VAE.",
            inputs=[ModelSocket.Input("model"), io.Latent.Input("samples")],
            outputs=[io.Image.Output(display_name="IMAGE")],
        )

    @classmethod
    def execute(cls, model: TrainingModel, samples: dict) -> io.NodeOutput:
        return io.NodeOutput(decode_comfy_latents(model.bundle, samples["samples"]))
