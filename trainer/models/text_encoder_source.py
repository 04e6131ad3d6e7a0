"""A family's text encoders and tokenizers from ComfyUI files (issue 13).

`text_encoder_1_path` .. `text_encoder_4_path` name the files in the family's order (`SLOTS`); an
all-in-one checkpoint's `text_encoders.*` part fills any slot they leave unset. Everything that can
be judged from names and shapes (kind, order, size, where the tokenizers come from) is checked
before any weight is read. Full-size encoders take ComfyUI's tokenizers (comfy_tokenizers.py); the
tiny flavour's take its own, built in code.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import CLIPTextModel, CLIPTextModelWithProjection, LlamaModel, T5EncoderModel

from ..config import resolve_path
from ..errors import ConfigError
from . import comfy_tokenizers
from .text_encoder_files import (
    KIND_NAMES,
    EncoderPlan,
    EncoderSlot,
    load_planned,
    order_hint,
    plan_text_encoder,
)
from .weights_file import WeightsFile

SLOTS: dict[str, list[EncoderSlot]] = {
    "flux": [
        EncoderSlot("clip_l", CLIPTextModel, "text_encoder"),
        EncoderSlot("t5", T5EncoderModel, "text_encoder_2"),
    ],
    "hidream": [
        EncoderSlot("clip_l", CLIPTextModelWithProjection, "text_encoder"),
        EncoderSlot("clip_g", CLIPTextModelWithProjection, "text_encoder_2"),
        EncoderSlot("t5", T5EncoderModel, "text_encoder_3"),
        EncoderSlot("llama", LlamaModel, "text_encoder_4"),
    ],
}
# Where ComfyUI's save_checkpoint puts each encoder inside `text_encoders.` (comfy/sd.py CLIP.get_sd).
CHECKPOINT_PREFIXES = {"clip_l": "clip_l.transformer.", "clip_g": "clip_g.transformer.",
                       "t5": "t5xxl.transformer.", "llama": "llama.transformer."}  # fmt: skip


def key_name(i: int) -> str:
    return f"text_encoder_{i + 1}_path"


def named_files(family: str, source: Any) -> list[WeightsFile | None]:
    """The files text_encoder_N_path names, opened (memory-mapped), one per slot; keys past the
    family's encoders are an error."""
    slots = SLOTS[family]
    paths = list(source.text_encoder_paths) + [None] * 4
    extra = [key_name(i) for i in range(len(slots), 4) if paths[i]]
    if extra:
        raise ConfigError(
            f"{source.origin}: {', '.join(extra)} set, but {family} has {len(slots)} text encoders "
            f"({order_hint()}); remove the key."
        )
    out: list[WeightsFile | None] = []
    for i in range(len(slots)):
        if not paths[i]:
            out.append(None)
            continue
        where = f"{source.origin}: key '{key_name(i)}'"
        path = resolve_path(paths[i], source.base_dir, where)
        out.append(WeightsFile.open(path, source.origin, key_name(i)))
    return out


def uses_files(source: Any) -> bool:
    return any(source.text_encoder_paths)


def checkpoint_views(family: str, checkpoint: WeightsFile | None) -> list[WeightsFile | None]:
    """Each slot's view into an all-in-one checkpoint's `text_encoders.*` part (None where absent)."""
    part = checkpoint.part("text_encoders") if checkpoint is not None else None
    views: list[WeightsFile | None] = []
    for slot in SLOTS[family]:
        view = part.view(CHECKPOINT_PREFIXES[slot.kind]) if part is not None else None
        views.append(view if view is not None and len(view) else None)
    return views


def plan_all(family: str, files: list[WeightsFile | None], origin: str) -> list[EncoderPlan]:
    """Plans for every slot; a slot with no file is an error naming its key."""
    missing = [
        f"{key_name(i)} ({KIND_NAMES[s.kind]})" for i, s in enumerate(SLOTS[family]) if files[i] is None
    ]
    if missing:
        raise ConfigError(
            f"{origin}: {family} from ComfyUI files needs every text encoder; set {', '.join(missing)} "
            f"({order_hint()}), or set pretrained_model_name_or_path to a diffusers folder."
        )
    return [plan_text_encoder(wf, slot) for wf, slot in zip(files, SLOTS[family], strict=True)]


def tokenizers_for(plans: list[EncoderPlan], source: Any) -> list[Any]:
    """One tokenizer per plan: the tiny flavour's for tiny encoders, ComfyUI's otherwise."""
    from .tiny import TEXT_TOKENS
    from .tiny_hidream import llama_tokenizer
    from .tokenizers import clip_tokenizer, t5_tokenizer

    root = None
    if not all(p.tiny for p in plans):
        root = comfy_tokenizers.comfyui_root(source.comfyui_path, source.origin)
    out = []
    for plan in plans:
        kind = {"clip_l": "clip", "clip_g": "clip"}.get(plan.slot.kind, plan.slot.kind)
        if plan.tiny:
            tiny = {"clip": lambda: clip_tokenizer(TEXT_TOKENS), "t5": lambda: t5_tokenizer(TEXT_TOKENS),
                    "llama": lambda: llama_tokenizer(TEXT_TOKENS)}  # fmt: skip
            out.append(tiny[kind]())
            continue
        tok = comfy_tokenizers.load_tokenizer(root, kind, source.origin, plan.max_positions)
        if plan.slot.kind == "clip_g":
            tok.pad_token = "!"  # SDXL/HiDream's CLIP-G tokenizer and ComfyUI's pad with "!" (id 0)
        out.append(tok)
    return out


def text_encoder_parts(
    family: str, source: Any, dtype: torch.dtype, checkpoint: WeightsFile | None = None
) -> dict[str, Any]:
    """{text_encoder..: module, tokenizer..: tokenizer} from text_encoder_N_path, and an all-in-one
    checkpoint's encoders for the keys left unset."""
    return TextEncoderFiles(family, source, checkpoint).load(dtype)


class TextEncoderFiles:
    """text_encoder_N_path planned (kinds, sizes and tokenizers checked) before anything heavy
    loads; `load(dtype)` then reads the weights."""

    def __init__(self, family: str, source: Any, checkpoint: WeightsFile | None = None):
        named = named_files(family, source)
        inside = checkpoint_views(family, checkpoint)
        files = [n if n is not None else c for n, c in zip(named, inside, strict=True)]
        self.plans = plan_all(family, files, source.origin)
        self.tokenizers = tokenizers_for(self.plans, source)

    def load(self, dtype: torch.dtype) -> dict[str, Any]:
        parts: dict[str, Any] = {}
        for plan, tok in zip(self.plans, self.tokenizers, strict=True):
            parts[plan.slot.component] = load_planned(plan, dtype)
            parts[plan.slot.component.replace("text_encoder", "tokenizer")] = tok
        return parts


def plan_text_encoder_files(family: str, source: Any) -> TextEncoderFiles | None:
    """None when no text_encoder_N_path is set (the folder's or tiny flavour's encoders stay)."""
    return TextEncoderFiles(family, source) if uses_files(source) else None


def files_only_parts(family: str, source: Any, flavour: str) -> dict[str, Any] | None:
    """The start of a model made of ComfyUI files alone (no folder, no all-in-one checkpoint): the
    scheduler, when the transformer, VAE and text-encoder keys are all set; None when none is."""
    keys = {"pretrained_transformer_model_name_or_path": source.pretrained_transformer_model_name_or_path,
            "pretrained_vae_model_name_or_path": source.pretrained_vae_model_name_or_path}  # fmt: skip
    if not uses_files(source) and not any(keys.values()):
        return None
    missing = [k for k, v in keys.items() if not v]
    if missing:
        raise ConfigError(
            f"{source.origin}: a model from ComfyUI files (no pretrained_model_name_or_path folder) needs "
            f"{', '.join(missing)} too: the diffusion-model file (models/diffusion_models) and ae.safetensors "
            "(models/vae)."
        )
    return {"scheduler": scheduler_for(family, flavour)}


def scheduler_for(family: str, flavour: str) -> Any:
    from .tiny import flux_scheduler
    from .tiny_hidream import hidream_scheduler

    return flux_scheduler(schnell=flavour == "schnell") if family == "flux" else hidream_scheduler(3.0)
