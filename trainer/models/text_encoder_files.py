"""Text encoders from ComfyUI `.safetensors` files into the transformers modules we train with.

ComfyUI's text-encoder files (`models/text_encoders/` or `models/clip/`: clip_l, clip_g, t5xxl_*,
llama_3.1_8b_*) use transformers' own names, with three differences handled here:

- CLIP: `text_model.*` (+ `text_projection.weight`); transformers 5's CLIPTextModel has no
  `text_model.` level, so Flux's CLIP-L strips it (and drops the projection it never uses).
- T5: `encoder.*` + `shared.weight`; the encoder's embedding is the shared one.
- Llama: `model.*` and no `lm_head`: a plain LlamaModel (HiDream reads its hidden states only).

Which config: the full-size ones ship as JSON in `configs/`; the tiny flavour's come from its
builders. The first whose every tensor shape matches the file wins (vocab size and CLIP's positions
are read from the file), so a file of another size or kind is a clear error before any weight loads.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
from accelerate import init_empty_weights
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    LlamaConfig,
    LlamaModel,
    PretrainedConfig,
    T5Config,
    T5EncoderModel,
)

from ..errors import ConfigError
from .weights_file import WeightsFile, load_module

CONFIG_DIR = Path(__file__).with_name("configs")
KIND_NAMES = {"clip_l": "CLIP-L", "clip_g": "CLIP-G", "t5": "T5-XXL", "llama": "Llama 3.1 8B"}
# Names ComfyUI files may carry that our modules do not hold (never weights we need).
_IGNORED = ("logit_scale", "text_model.embeddings.position_ids", "lm_head.weight", "spiece_model")


@dataclass(frozen=True)
class EncoderSlot:
    """One text encoder of a family: what kind of file it takes and the module class it becomes."""

    kind: str  # clip_l | clip_g | t5 | llama
    cls: type
    component: str  # the diffusers component name (text_encoder, text_encoder_2, ...)


# -- what a file is ---------------------------------------------------------------------------------


def detect_kind(names: list[str]) -> str | None:
    """ "clip", "t5", "llama", "diffusion model", "LoRA" or None, from tensor names alone."""
    s = set(names)
    if any(n.startswith("text_model.encoder.layers.") for n in s):
        return "clip"
    if any(n.startswith("encoder.block.") for n in s):
        return "t5"
    if any(n.startswith(("model.layers.", "layers.")) and "self_attn.q_proj" in n for n in s):
        return "llama"
    if any("lora_" in n or n.startswith("lycoris_") for n in s):
        return "LoRA"
    if any(n.startswith(("double_blocks.", "transformer_blocks.", "model.diffusion_model.")) for n in s):
        return "diffusion model"
    return None


def check_kind(wf: WeightsFile, slot: EncoderSlot) -> None:
    """A wrong kind of file in a slot is an error naming the key, the file and what it holds."""
    found = detect_kind(wf.names)
    if found == "clip":  # the full-size CLIPs tell themselves apart by width (tiny ones by config)
        width = wf.shape("text_model.embeddings.token_embedding.weight")[-1]
        found = {768: "clip_l", 1280: "clip_g"}.get(
            width, slot.kind if slot.kind.startswith("clip") else "clip"
        )
    if found == slot.kind:
        return
    what = {"clip": "a CLIP text encoder", "clip_l": "a CLIP-L text encoder", "clip_g": "a CLIP-G text encoder",
            "t5": "a T5 text encoder", "llama": "a Llama text encoder"}.get(
        found or "", f"a {found}" if found else "no text encoder ComfyUI writes"
    )  # fmt: skip
    raise ConfigError(
        f"{wf.where}: {wf.path.name} holds {what}, but this key takes the {KIND_NAMES[slot.kind]} text "
        f"encoder. Check the order of text_encoder_N_path ({order_hint()})."
    )


def order_hint() -> str:
    return "Flux: 1 CLIP-L, 2 T5-XXL; HiDream: 1 CLIP-L, 2 CLIP-G, 3 T5-XXL, 4 Llama 3.1 8B"


# -- file names -> module names ---------------------------------------------------------------------


def module_names(wf: WeightsFile, slot: EncoderSlot) -> dict[str, str]:
    """{module state-dict name: file name} for the tensors this slot's module takes."""
    out: dict[str, str] = {}
    for name in wf.names:
        if name in _IGNORED or name.endswith(".position_ids"):
            continue
        if slot.cls is CLIPTextModel:
            if name.startswith("text_projection"):
                continue  # Flux's CLIP-L uses the pooled output only
            out[name.removeprefix("text_model.")] = name
        elif slot.cls is LlamaModel:
            out[name.removeprefix("model.")] = name
        elif name == "text_projection":  # old CLIPSave layout: a matrix, transposed
            out["text_projection.weight"] = name
        else:
            out[name] = name
    if slot.cls is T5EncoderModel and "encoder.embed_tokens.weight" not in out and "shared.weight" in out:
        out["encoder.embed_tokens.weight"] = "shared.weight"
    return out


def _shape(wf: WeightsFile, file_name: str) -> tuple[int, ...]:
    shape = wf.shape(file_name)
    return tuple(reversed(shape)) if file_name == "text_projection" else shape


# -- configs ----------------------------------------------------------------------------------------


def full_size_config(kind: str) -> PretrainedConfig:
    file = {"clip_l": "clip_l", "clip_g": "clip_g", "t5": "t5xxl", "llama": "llama_3_1_8b"}[kind]
    values = json.loads((CONFIG_DIR / f"{file}.json").read_text(encoding="utf-8"))
    values.pop("_comment", None)
    cls = {"clip_l": CLIPTextConfig, "clip_g": CLIPTextConfig, "t5": T5Config, "llama": LlamaConfig}[kind]
    return cls(**values)


@cache
def tiny_configs(kind: str) -> tuple[PretrainedConfig, ...]:
    """The tiny flavour's configs of this kind (built on the meta device: no weights)."""
    from . import tiny, tiny_hidream

    with init_empty_weights():
        flux, hidream = tiny.tiny_flux_parts(0), tiny_hidream.tiny_hidream_parts(0)
    names = {
        "clip_l": [(flux, "text_encoder"), (hidream, "text_encoder")],
        "clip_g": [(hidream, "text_encoder_2")],
        "t5": [(flux, "text_encoder_2"), (hidream, "text_encoder_3")],
        "llama": [(hidream, "text_encoder_4")],
    }[kind]
    return tuple(parts[name].config for parts, name in names)


def _fit_config(config: PretrainedConfig, wf: WeightsFile, names: dict[str, str], slot: EncoderSlot) -> None:
    """Read the sizes a release may change from the file: vocabulary and CLIP's positions."""
    emb = {"clip": "embeddings.token_embedding.weight", "t5": "shared.weight", "llama": "embed_tokens.weight"}
    family = "clip" if slot.kind.startswith("clip") else slot.kind
    key = emb[family]
    if family == "clip" and slot.cls is not CLIPTextModel:
        key = "text_model." + key
    if key in names:
        config.vocab_size = _shape(wf, names[key])[0]
    pos = [k for k in names if k.endswith("embeddings.position_embedding.weight")]
    if family == "clip" and pos:
        config.max_position_embeddings = _shape(wf, names[pos[0]])[0]


def _build(slot: EncoderSlot, config: PretrainedConfig) -> torch.nn.Module:
    """Parameters on meta (no memory, no init); computed buffers real, as load_module needs."""
    with init_empty_weights(include_buffers=False):
        return slot.cls(config)


def _fits(module: torch.nn.Module, wf: WeightsFile, names: dict[str, str]) -> bool:
    params = dict(module.state_dict())
    for name, t in params.items():
        if name in names:
            if tuple(t.shape) != _shape(wf, names[name]):
                return False
        elif not _is_computed_buffer(module, name):
            return False
    return set(names) <= set(params)


def _is_computed_buffer(module: torch.nn.Module, name: str) -> bool:
    return name in dict(module.named_buffers()) and not dict(module.named_buffers())[name].is_meta


def choose_module(wf: WeightsFile, slot: EncoderSlot, names: dict[str, str]) -> tuple[torch.nn.Module, bool]:
    """The module (parameters on meta) whose shapes fit the file, and whether it is a tiny one."""
    candidates = [(full_size_config(slot.kind), False)] + [(c, True) for c in tiny_configs(slot.kind)]
    for config, tiny in candidates:
        config = type(config).from_dict(config.to_dict())  # a copy, so fitting never leaks
        _fit_config(config, wf, names, slot)
        module = _build(slot, config)
        if _fits(module, wf, names):
            return module, tiny
    raise ConfigError(
        f"{wf.where}: {wf.path.name} is a {KIND_NAMES[slot.kind]}-like file whose tensor shapes match "
        f"no {KIND_NAMES[slot.kind]} TuneGraph knows (the full-size release or the tiny test model); "
        f"use the {KIND_NAMES[slot.kind]} file ComfyUI's own workflows use for this model."
    )


# -- loading ----------------------------------------------------------------------------------------


@dataclass
class EncoderPlan:
    """What one file will load as, judged from names and shapes only (no weight read yet)."""

    wf: WeightsFile
    slot: EncoderSlot
    names: dict[str, str]
    module: torch.nn.Module  # parameters on the meta device
    tiny: bool

    @property
    def max_positions(self) -> int | None:
        return (
            getattr(self.module.config, "max_position_embeddings", None)
            if self.slot.kind.startswith("clip")
            else None
        )


def plan_text_encoder(wf: WeightsFile, slot: EncoderSlot) -> EncoderPlan:
    check_kind(wf, slot)
    names = module_names(wf, slot)
    module, tiny = choose_module(wf, slot, names)
    return EncoderPlan(wf, slot, names, module, tiny)


def load_planned(plan: EncoderPlan, dtype: torch.dtype) -> torch.nn.Module:
    """The planned module filled from its file (scaled fp8 folded, every tensor cast to `dtype`)."""
    module, wf = plan.module, plan.wf
    state = module.state_dict()
    tensors: dict[str, Callable[[], torch.Tensor]] = {
        n: (lambda b=b: b) for n, b in module.named_buffers() if not b.is_meta and n in state
    }
    read = _reader(wf, dtype)
    for name, file_name in plan.names.items():
        tensors[name] = lambda f=file_name: read(f)
    load_module(module, tensors, dtype, where=f"{wf.where}: {wf.path.name}")
    return module.requires_grad_(False).eval()


def load_text_encoder(wf: WeightsFile, slot: EncoderSlot, dtype: torch.dtype) -> torch.nn.Module:
    """The slot's module from `wf` in one step (see `plan_text_encoder`, `load_planned`)."""
    return load_planned(plan_text_encoder(wf, slot), dtype)


def _reader(wf: WeightsFile, dtype: torch.dtype) -> Callable[[str], torch.Tensor]:
    """Reads a file tensor in `dtype`; T5's shared embedding is read once for both its names."""
    shared: dict[str, torch.Tensor] = {}

    def read(name: str) -> torch.Tensor:
        if name in shared:
            return shared[name]
        t = wf.tensor(name, dtype)
        if name == "text_projection":
            t = t.t().contiguous()
        if name == "shared.weight":
            shared[name] = t
        return t

    return read
