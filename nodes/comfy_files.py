"""LoadTrainingModel's ComfyUI-file widgets: the lists the stock loaders show, as config keys.

The diffusion model comes from `diffusion_models` (models/diffusion_models and models/unet), the
VAE from `vae`, the text encoders from `text_encoders` (models/text_encoders and models/clip), in
the family's order (Flux: CLIP-L, T5-XXL; HiDream: CLIP-L, CLIP-G, T5-XXL, Llama 3.1 8B). The node
writes the same keys the CLI reads, plus `comfyui_path` (the running ComfyUI, where the tokenizers
are), so a node-made run replays from the command line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

NONE = "none"
# widget -> (ComfyUI folder name, config key)
FILE_WIDGETS = {
    "diffusion_model": ("diffusion_models", "pretrained_transformer_model_name_or_path"),
    "vae": ("vae", "pretrained_vae_model_name_or_path"),
    **{f"text_encoder_{i}": ("text_encoders", f"text_encoder_{i}_path") for i in range(1, 5)},
}
FILE_KEYS = tuple(key for _, key in FILE_WIDGETS.values())
_TOOLTIPS = {
    "diffusion_model": "a ComfyUI diffusion model (models/diffusion_models or models/unet); 'none' for a "
    "diffusers folder or the tiny flavour",
    "vae": "ae.safetensors (models/vae) with a diffusion-model file",
    "text_encoder_1": "CLIP-L (clip_l / clip_l_hidream), from models/text_encoders or models/clip",
    "text_encoder_2": "Flux: T5-XXL (t5xxl_fp16 / fp8); HiDream: CLIP-G (clip_g_hidream)",
    "text_encoder_3": "HiDream: T5-XXL",
    "text_encoder_4": "HiDream: Llama 3.1 8B (llama_3.1_8b_instruct_fp8_scaled)",
}


def comfy_file_inputs() -> list[Any]:
    import folder_paths
    from comfy_api.latest import io

    return [
        io.Combo.Input(
            widget,
            options=[NONE, *folder_paths.get_filename_list(folder)],
            default=NONE,
            tooltip=_TOOLTIPS[widget],
        )
        for widget, (folder, _) in FILE_WIDGETS.items()
    ]


def comfy_file_keys(values: dict[str, str]) -> dict[str, Any]:
    """Config keys for the chosen files (full paths), plus this ComfyUI as `comfyui_path`."""
    import folder_paths

    keys: dict[str, Any] = {}
    for widget, (folder, key) in FILE_WIDGETS.items():
        name = values.get(widget) or NONE
        if name != NONE:
            keys[key] = folder_paths.get_full_path_or_raise(folder, name)
    if keys:
        keys["comfyui_path"] = str(Path(folder_paths.__file__).resolve().parent)
    return keys
