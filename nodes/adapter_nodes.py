"""SaveAdapter (into models/loras/tunegraph/) and ApplyAdapter (onto a ComfyUI MODEL, through
ComfyUI's own LoRA loading, as LoraLoaderModelOnly does)."""

from __future__ import annotations

import shutil
from pathlib import Path

from comfy_api.latest import io, ui

from ..trainer.errors import ConfigError
from . import paths
from .handles import AdapterHandle
from .sockets import CATEGORY, AdapterSocket

NONE = "none"


def lora_target(name: str) -> Path:
    """models/loras/tunegraph/<name>.safetensors, confined like every path from a graph."""
    clean = name.strip().removesuffix(".safetensors")
    root = paths.loras_dir() / "tunegraph"
    return paths.confine(clean + ".safetensors", root, [root], "SaveAdapter: name")


class SaveAdapter(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TuneGraphSaveAdapter",
            display_name="Save Adapter",
            category=CATEGORY,
            description="Copy a trained adapter into models/loras/tunegraph/<name>.safetensors, where "
            "LoraLoaderModelOnly and ApplyAdapter find it.",
            is_output_node=True,
            inputs=[AdapterSocket.Input("adapter"), io.String.Input("name", default="lokr")],
            outputs=[io.String.Output(display_name="lora_name")],
        )

    @classmethod
    def execute(cls, adapter: AdapterHandle, name: str) -> io.NodeOutput:
        target = lora_target(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        shutil.copyfile(adapter.path, tmp)
        tmp.replace(target)
        lora_name = target.relative_to(paths.loras_dir()).as_posix()
        return io.NodeOutput(lora_name, ui=ui.PreviewText(f"saved {lora_name} ({adapter.steps} steps)"))


def lora_choices() -> list[str]:
    try:
        import folder_paths

        return [NONE, *folder_paths.get_filename_list("loras")]
    except ImportError:
        return [NONE]


class ApplyAdapter(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TuneGraphApplyAdapter",
            display_name="Apply Adapter",
            category=CATEGORY,
            description="Apply a trained adapter (from TrainLoKr) or a file from models/loras to a ComfyUI MODEL "
            "with ComfyUI's own LoRA loader, at the given strength.",
            inputs=[
                io.Model.Input("model"),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01),
                io.Combo.Input("lora_name", options=lora_choices(), default=NONE),
                AdapterSocket.Input("adapter", optional=True, tooltip="wins over lora_name"),
            ],
            outputs=[io.Model.Output(display_name="model")],
        )

    @classmethod
    def execute(cls, model, strength: float, lora_name: str, adapter: AdapterHandle | None = None):
        import comfy.sd
        import comfy.utils
        import folder_paths

        if adapter is not None:
            path = str(adapter.path)
        elif lora_name != NONE:
            path = folder_paths.get_full_path_or_raise("loras", lora_name)
        else:
            raise ConfigError("ApplyAdapter: connect an adapter or choose a lora_name")
        if strength == 0:
            return io.NodeOutput(model)
        lora = comfy.utils.load_torch_file(path, safe_load=True)
        patched, _ = comfy.sd.load_lora_for_models(model, None, lora, strength, 0)
        return io.NodeOutput(patched)
