"""Flux and HiDream transformers and the Flux VAE from ComfyUI-format single files, offline.

The modules are the same diffusers classes a diffusers folder gives, so adapters, quantisation and
parity work unchanged. Configs: full-size shapes use the JSON shipped in `configs/` (what the
diffusers folders on the hub hold); other shapes are read from the tensors (widths, heads, block
counts), with what shapes cannot tell (Flux's RoPE axes for an unusual head size, HiDream's
`llama_layers`) taken from the `tunegraph_unet_config` metadata `tunegraph tiny-models --comfyui` and
our fixtures write. Key layouts: Flux is BFL's (our inverse of comfy_keys.flux_to_comfy: diffusers'
converter hard-codes width 3072); HiDream keeps diffusers' names; the VAE is LDM's, converted by
diffusers' own `convert_ldm_vae_checkpoint` (exact; the VAE is small enough to convert in memory).
Every module is built on the meta device and filled block by block, each tensor read straight from
the file into its own memory (weights_file.py): host RAM peaks at ~1.0x the loaded weights.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from .comfy_keys import UNET_CONFIG_KEY, flux_from_comfy_plan, flux_source_tensor
from .fp8_base import FP8_FILE, fp8_layers, not_fp8_file, swap_fp8_linears
from .weights_file import WeightsFile, empty_weights, load_module

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

# One name that only each kind of file has (ComfyUI's model_detection uses the same ones).
SIGNATURES = {
    "flux": "double_blocks.0.img_attn.qkv.weight",
    "hidream": "caption_projection.0.linear.weight",
    "vae": "decoder.conv_in.weight",
}
_LORA_MARKS = ("lora_", "lokr_", "loha_", ".alpha", "lora.", "diff_b", ".dora_scale")


def shipped_config(name: str) -> dict[str, Any]:
    return json.loads((CONFIG_DIR / f"{name}.json").read_text(encoding="utf-8"))


def what_is(view: WeightsFile) -> str:
    """ "flux", "hidream", "vae", "lora", "text encoder" or "unknown": what a file view holds."""
    for kind, name in SIGNATURES.items():
        if name in view:
            return kind
    if any(mark in n for n in view.names[:200] for mark in _LORA_MARKS):
        return "lora"
    if any(
        n.startswith(("text_model.", "encoder.block.", "model.layers.", "shared.")) for n in view.names[:200]
    ):
        return "text encoder"
    return "unknown"


def expect(view: WeightsFile, kind: str) -> None:
    """A ConfigError naming the file and key when `view` does not hold a `kind` model."""
    found = what_is(view)
    if found == kind:
        return
    hint = {
        "lora": "this is a LoRA/LyCORIS adapter, not a model: pick the base model file here",
        "vae": "this is a VAE: set it as pretrained_vae_model_name_or_path",
        "text encoder": "this is a text encoder: name it in text_encoder_N_path",
        "flux": "this is a Flux model: set model_family flux",
        "hidream": "this is a HiDream model: set model_family hidream",
    }.get(found, "no known model layout was found")
    want = "a VAE (ae.safetensors)" if kind == "vae" else f"a {kind} diffusion model"
    raise ConfigError(f"{view.where}: {view.path.name} is not {want} ({hint}).")


def model_part(wf: WeightsFile, kind: str) -> WeightsFile:
    """The view holding the `kind` model in a diffusion-model file or an all-in-one checkpoint."""
    view = wf.part("vae") if kind == "vae" else wf.part("diffusion_model")
    view = view or wf
    expect(view, kind)
    return view


def _count(view: WeightsFile, prefix: str) -> int:
    return len({n[len(prefix) :].split(".", 1)[0] for n in view.names if n.startswith(prefix)})


def _metadata_unet(view: WeightsFile) -> dict[str, Any] | None:
    raw = view.metadata.get(UNET_CONFIG_KEY)
    return json.loads(raw) if raw else None


def _axes(head_dim: int) -> list[int]:
    """Flux's RoPE axes: (16, 56, 56) at head 128; otherwise a quarter for the index axis, the rest
    split between rows and columns (the tiny model's 4+6+6 = 16)."""
    if head_dim == 128:
        return [16, 56, 56]
    first = (head_dim // 4) // 2 * 2
    return [first, (head_dim - first) // 2, (head_dim - first) // 2]


# -- Flux ------------------------------------------------------------------------------------------


def flux_config(view: WeightsFile) -> dict[str, Any]:
    """diffusers FluxTransformer2DModel config from a BFL-keyed view."""
    hidden, in_channels = view.shape("img_in.weight")
    head_dim = view.shape("double_blocks.0.img_attn.norm.query_norm.scale")[0]
    if view.shape("double_blocks.0.img_mlp.0.weight")[0] != 4 * hidden:
        raise ConfigError(
            f"{view.where}: {view.path.name}: Flux MLP width is not 4x hidden; unsupported variant"
        )
    meta = _metadata_unet(view)
    config = {
        "attention_head_dim": head_dim,
        "axes_dims_rope": list(meta["axes_dim"]) if meta else _axes(head_dim),
        "guidance_embeds": "guidance_in.in_layer.weight" in view,
        "in_channels": in_channels,
        "joint_attention_dim": view.shape("txt_in.weight")[1],
        "num_attention_heads": hidden // head_dim,
        "num_layers": _count(view, "double_blocks."),
        "num_single_layers": _count(view, "single_blocks."),
        "out_channels": None,
        "patch_size": 1,
        "pooled_projection_dim": view.shape("vector_in.in_layer.weight")[1],
    }
    if view.shape("final_layer.linear.weight")[0] != in_channels:
        config["out_channels"] = view.shape("final_layer.linear.weight")[0]
    shipped = shipped_config("flux-dev" if config["guidance_embeds"] else "flux-schnell")
    shipped.pop("_class_name")
    return shipped if config == shipped else config


def flux_flavour(view: WeightsFile) -> str:
    """dev (guidance embedding) or schnell (none): the only Flux flavours a file tells apart."""
    return "dev" if "guidance_in.in_layer.weight" in view else "schnell"


def _flux_tensors(view: WeightsFile, plan: dict, read: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """(diffusers name, tensor) in file order, each read straight from its rows of the file."""
    order = {name: i for i, name in enumerate(view.names)}
    for name, (src, start, stop, swap) in sorted(plan.items(), key=lambda item: order[item[1][0]]):
        if start is not None and stop is None:
            stop = view.shape(src)[0]
        yield name, flux_source_tensor(read, src, start, stop, swap)


def load_flux_transformer(
    view: WeightsFile, dtype: torch.dtype | None, fp8_base: bool = False
) -> torch.nn.Module:
    from diffusers import FluxTransformer2DModel

    config = flux_config(view)
    with empty_weights():
        module = FluxTransformer2DModel.from_config(config)
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    try:
        plan = flux_from_comfy_plan(view.names, hidden)
    except ConfigError as e:
        raise ConfigError(f"{view.where}: {view.path.name}: {e}") from None
    expected = set(module.state_dict())
    if set(plan) != expected:  # judged from names alone, before reading any weight
        gap = sorted(expected ^ set(plan))
        raise ConfigError(
            f"{view.where}: {view.path.name} is an incomplete Flux model ({len(gap)} tensor(s) differ, "
            f"e.g. {', '.join(gap[:4])}); use the complete diffusion-model file."
        )
    source = {name: src for name, (src, *_) in plan.items()}
    return _fill(module, view, source, dtype, fp8_base, lambda read: _flux_tensors(view, plan, read), "flux")


def _fill(
    module, view: WeightsFile, source: dict[str, str], dtype, fp8_base: bool, tensors: Any, family: str
):
    """Load `module` from `view` (`source`: diffusers name -> file name); with `fp8_base` the file's
    float8 Linear weights stay float8 in Fp8Linear layers (fp8_base.py)."""
    where = f"{view.where}: {view.path.name}"
    fp8 = set()
    if fp8_base:
        from ..quantize import KEEP, PRECISION_ATTR

        fp8 = fp8_layers(
            module, lambda name: view.dtype(source[name]) if name in source else None, KEEP[family]
        )
        if not fp8:
            raise not_fp8_file(view.where, view.path.name)
        swap_fp8_linears(module, fp8)
        setattr(module, PRECISION_ATTR, FP8_FILE)
    raw = {source[f"{n}.weight"] for n in fp8}

    def read(src: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        return view.raw(src, rows) if src in raw else view.tensor(src, dtype, rows)

    module = load_module(module, tensors(read), None, where)
    for name in fp8:
        scale = view.scale(source[f"{name}.weight"])
        if scale is not None:
            module.get_submodule(name).scale.fill_(scale)
    return module


# -- HiDream ---------------------------------------------------------------------------------------

_HIDREAM_FULL = {"inner": 2560, "num_layers": 16, "num_single_layers": 32}


def hidream_config(view: WeightsFile) -> dict[str, Any]:
    inner = view.shape("x_embedder.proj.weight")[0]
    counts = {
        "num_layers": _count(view, "double_stream_blocks."),
        "num_single_layers": _count(view, "single_stream_blocks."),
    }
    if {"inner": inner, **counts} == _HIDREAM_FULL:
        config = shipped_config("hidream-i1")
        config.pop("_class_name")
        return config
    meta = _metadata_unet(view)
    if meta is None:
        raise ConfigError(
            f"{view.where}: {view.path.name} is a HiDream model of unusual size (width {inner}, {counts}) "
            f"without '{UNET_CONFIG_KEY}' metadata, so its llama_layers cannot be known; use the "
            "full-size HiDream-I1 file or one written by `tunegraph tiny-models --comfyui`."
        )
    return {k: v for k, v in meta.items() if k != "image_model"}


def load_hidream_transformer(
    view: WeightsFile, dtype: torch.dtype | None, fp8_base: bool = False
) -> torch.nn.Module:
    from diffusers import HiDreamImageTransformer2DModel

    with empty_weights():
        module = HiDreamImageTransformer2DModel.from_config(hidream_config(view))
    # diffusers' convert_hidream_transformer_to_diffusers only strips `model.diffusion_model.`,
    # which the view has done: the names are the module's own.
    source = {name: name for name in view.names}
    return _fill(
        module,
        view,
        source,
        dtype,
        fp8_base,
        lambda read: {n: (lambda n=n: read(n)) for n in source},
        "hidream",
    )


# -- VAE -------------------------------------------------------------------------------------------


def vae_config(view: WeightsFile) -> dict[str, Any]:
    """diffusers AutoencoderKL config of an LDM-keyed VAE; Flux's latent shift/scale."""
    blocks = _count(view, "encoder.down.")
    channels = [view.shape(f"encoder.down.{i}.block.0.conv1.weight")[0] for i in range(blocks)]
    config = shipped_config("flux-vae")
    config.pop("_class_name")
    inferred = {
        **config,
        "block_out_channels": channels,
        "down_block_types": ["DownEncoderBlock2D"] * blocks,
        "up_block_types": ["UpDecoderBlock2D"] * blocks,
        "latent_channels": view.shape("decoder.conv_in.weight")[1],
        "layers_per_block": _count(view, "encoder.down.0.block."),
        "mid_block_add_attention": "encoder.mid.attn_1.q.weight" in view,
        "norm_num_groups": min(32, channels[0] // 2),  # 32 at full size; the tiny VAE's 4
        "use_quant_conv": "quant_conv.weight" in view,
        "use_post_quant_conv": "post_quant_conv.weight" in view,
    }
    if inferred["latent_channels"] != 16:
        raise ConfigError(
            f"{view.where}: {view.path.name} is not a Flux VAE (16 latent channels); use ae.safetensors"
        )
    return inferred


def load_vae(view: WeightsFile, dtype: torch.dtype | None) -> torch.nn.Module:
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    config = vae_config(view)
    with empty_weights():
        module = AutoencoderKL.from_config(config)
    sd = convert_ldm_vae_checkpoint({n: view.tensor(n) for n in view.names}, config)
    return load_module(module, sd, dtype, where=f"{view.where}: {view.path.name}")


# -- entry points for the families -----------------------------------------------------------------

TRANSFORMER_LOADERS = {"flux": load_flux_transformer, "hidream": load_hidream_transformer}


def transformer_from_file(
    family: str, wf: WeightsFile, dtype: torch.dtype | None, fp8_base: bool = False
) -> torch.nn.Module:
    return TRANSFORMER_LOADERS[family](model_part(wf, family), dtype, fp8_base)


def vae_from_file(wf: WeightsFile, dtype: torch.dtype | None) -> torch.nn.Module:
    return load_vae(model_part(wf, "vae"), dtype)


def file_flavour(family: str, wf: WeightsFile, origin: str) -> str:
    """The flavour a file tells (Flux dev/schnell); HiDream's full/dev/fast share one layout."""
    view = model_part(wf, family)
    if family == "flux":
        return flux_flavour(view)
    raise ConfigError(
        f"{origin}: model_flavour is not set and {wf.path.name} cannot tell it (HiDream full, dev and "
        "fast files have the same layout): set model_flavour to full, dev or fast."
    )


def source_flavour(family: str, source: Any) -> str | None:
    """The flavour the ComfyUI file(s) of a ModelSource tell, or None when no file is named."""
    for key in ("pretrained_transformer_model_name_or_path", "pretrained_model_name_or_path"):
        wf = source.weights_file(key)
        if wf is not None:
            return file_flavour(family, wf, source.origin)
    return None


def checkpoint_parts(family: str, wf: WeightsFile, dtype: torch.dtype | None, source: Any) -> dict[str, Any]:
    """Transformer and VAE of an all-in-one ComfyUI checkpoint (`model.diffusion_model.*`, `vae.*`),
    plus its text encoders through `checkpoint_text_encoders`."""
    if wf.part("vae") is None:
        raise ConfigError(
            f"{wf.where}: {wf.path.name} holds no VAE (`vae.*`), so it is a diffusion-model file, not an "
            "all-in-one checkpoint: set it as pretrained_transformer_model_name_or_path instead."
        )
    fp8_base = getattr(source, "base_model_precision", None) == FP8_FILE
    parts = {
        "transformer": transformer_from_file(family, wf, dtype, fp8_base),
        "vae": vae_from_file(wf, dtype),
    }
    parts.update(checkpoint_text_encoders(family, wf, source, dtype))
    return parts


def checkpoint_text_encoders(
    family: str, wf: WeightsFile, source: Any, dtype: torch.dtype | None = None
) -> dict[str, Any]:
    """Text encoders, tokenizers and scheduler for an all-in-one checkpoint: its `text_encoders.*`
    part, with any text_encoder_N_path key replacing that encoder (text_encoder_source.py)."""
    from .text_encoder_source import TextEncoderFiles, scheduler_for

    flavour = source.flavour or (file_flavour(family, wf, source.origin) if family == "flux" else "full")
    parts = TextEncoderFiles(family, source, wf).load(dtype or torch.float32)
    return {**parts, "scheduler": scheduler_for(family, flavour)}
