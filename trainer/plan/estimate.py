"""Peak device memory and host RAM per phase of a run: load, cache fill, training step, validation.

The phases follow "memory by phase" (issue 13): the transformer is loaded and (if asked) quantised,
the text encoders and VAE are on the device only while the cache is filled and the VAE again while
validation decodes (validation prompts are encoded with the cache), unless keep_vae_loaded or
vae_cache_ondemand keep the VAE on the device; on demand, latents are also encoded between steps.
Measured or exact: frozen weights (file headers / meta-built model), adapter parameters and their
gradients (the adapter built on fake tensors), optimizer state (per optimizer, checked on CPU),
activations (fake-tensor forward, activations.py). Estimated, marked so: quantised scales (weights.QUANT_BYTES),
inference and VAE working memory, and the CUDA context.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .activations import Activations, Shape, measure
from .inputs import PlanInputs
from .optimizer_state import scalar_state_bytes, state_bytes
from .weights import TransformerSizes, base_bytes, meta_transformer, transformer_sizes

GiB = 2**30
CUDA_CONTEXT = int(0.5 * GiB)  # CUDA context + allocator slack (estimate; calibrate on a GPU)


@dataclass
class Part:
    name: str
    device: int = 0
    host: int = 0
    note: str = ""


@dataclass
class Phase:
    name: str
    parts: list[Part] = field(default_factory=list)

    @property
    def device(self) -> int:
        return sum(p.device for p in self.parts)

    @property
    def host(self) -> int:
        return sum(p.host for p in self.parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "phase": self.name,
            "device_bytes": self.device,
            "host_bytes": self.host,
            "parts": [p.__dict__ for p in self.parts],
        }


@dataclass
class MemoryPlan:
    inputs: PlanInputs
    phases: list[Phase]
    activations: Activations
    settings: dict[str, Any]

    @property
    def peak(self) -> Phase:
        return max(self.phases, key=lambda p: p.device)

    def fits(self, budget: int) -> bool:
        return self.peak.device <= budget

    def to_dict(self) -> dict[str, Any]:
        return {
            "settings": self.settings,
            "peak_device_bytes": self.peak.device,
            "peak_phase": self.peak.name,
            "activations": self.activations.to_dict(),
            "phases": [p.to_dict() for p in self.phases],
            "basis": dict(self.inputs.sources),
        }


_SIZES_CACHE: dict[tuple, TransformerSizes] = {}


def _transformer_sizes(inp: PlanInputs) -> TransformerSizes:
    key = (inp.family, repr(sorted(inp.transformer_config.items())))
    if key not in _SIZES_CACHE:
        _SIZES_CACHE[key] = transformer_sizes(
            inp.family, meta_transformer(inp.family, inp.transformer_config)
        )
    return _SIZES_CACHE[key]


_ACT_CACHE: dict[tuple, Activations] = {}


def activations_for(inp: PlanInputs, cfg: Any, target: str) -> Activations:
    """Measured (fake tensors) once per distinct setting in this process."""
    from ..models.registry import get_family

    w, h = inp.bucket_px
    shape = Shape(inp.batch, h // 8, w // 8, inp.text_tokens)
    bypass = inp.base_precision != "no_change"
    key = (inp.family, inp.flavour, repr(sorted(inp.transformer_config.items())), shape, inp.dtype)
    adapter = (
        "lora_type",
        "lycoris_config",
        "lora_rank",
        "flux_lora_target",
        "hidream_use_load_balancing_loss",
    )
    key += (target, inp.checkpointing, bypass, tuple(getattr(cfg, k, None) for k in adapter))
    if key not in _ACT_CACHE:
        _ACT_CACHE[key] = measure(
            get_family(inp.family),
            inp.transformer_config,
            shape,
            cfg,
            dtype=inp.dtype,
            target=target,
            checkpointing=inp.checkpointing,
            bypass=bypass,
            flavour=inp.flavour,
        )
    return _ACT_CACHE[key]


def _encoder_bytes(inp: PlanInputs) -> int:
    total = 0
    for params, precision in zip(inp.encoder_params, inp.encoder_precisions, strict=True):
        per = (
            1.0
            if precision in ("int8-quanto", "int8-torchao", "fp8-quanto", "fp8-torchao")
            else inp.dtype_bytes
        )
        total += int(params * per)
    return total


def _offload_device_bytes(sizes: TransformerSizes, inp: PlanInputs, weight_bytes: int) -> int:
    """What group offload leaves on the device: modules outside the blocks, plus the group(s) in
    use (two with a prefetching stream). leaf_level moves single modules."""
    go = inp.group_offload
    if not go or not inp.checkpointing:  # without checkpointing the backward keeps every block's weights
        return weight_bytes
    per_param = weight_bytes / max(1, sizes.params)
    groups = 2 if go.get("use_stream") else 1
    if go.get("type") == "leaf_level":
        return int(per_param * sizes.largest_leaf * groups)
    onboard = sizes.outside_blocks + sizes.largest_block * go.get("blocks_per_group", 1) * groups
    return int(per_param * min(sizes.params, onboard))


def _vae_working(px: tuple[int, int], batch: int, inp: PlanInputs) -> int:
    """VAE encode/decode working memory: about three full-resolution feature maps of the VAE's
    widest full-resolution layer (estimate, the decoder's last up-block)."""
    return 3 * px[0] * px[1] * inp.vae_channels * inp.dtype_bytes * batch


def build_plan(inp: PlanInputs, cfg: Any, target: str = "cuda") -> MemoryPlan:
    sizes = _transformer_sizes(inp)
    t_params = inp.transformer_params or sizes.params
    full = t_params * inp.dtype_bytes
    trained = base_bytes(sizes, inp.base_precision, inp.dtype_bytes, t_params)
    on_device = _offload_device_bytes(sizes, inp, trained)
    parked = trained - on_device
    act = activations_for(inp, cfg, target)
    enc, vae = _encoder_bytes(inp), inp.vae_params * inp.dtype_bytes
    adapter = sum(act.adapter_numels) * act.adapter_bytes_per_value
    opt = state_bytes(inp.optimizer, act.adapter_numels, act.adapter_bytes_per_value)
    opt += scalar_state_bytes(inp.optimizer, len(act.adapter_numels), act.adapter_bytes_per_value)
    quant_note = f"{inp.base_precision} (scales estimated)" if inp.base_precision != "no_change" else ""
    ctx = Part("CUDA context (estimate)", CUDA_CONTEXT if target == "cuda" else 0)
    host_parked = Part(
        "offloaded transformer weights", host=0 if inp.group_offload.get("to_disk") else parked
    )
    load = Phase("load", [ctx])
    if inp.loads_on_host:
        load.parts.append(
            Part("transformer (quantised/offloaded in host RAM first)", on_device, note=quant_note)
        )
        load.parts.append(Part("components read into host RAM first", host=full + enc + vae + trained - full))
    else:
        load.parts.append(Part("transformer (as loaded)", full, note=dtype_name(inp.dtype)))
        if inp.base_precision != "no_change":
            load.parts.append(Part("quantised copy, being made", trained, note=quant_note))
        load.parts.append(Part("components read into host RAM first", host=full + enc + vae))
    cache = Phase(
        "cache fill",
        [
            ctx,
            Part("transformer", on_device, note=quant_note),
            Part("text encoders", enc),
            Part("VAE", vae),
            Part("VAE encode working memory (estimate)", _vae_working(inp.bucket_px, 1, inp)),
            host_parked,
        ],
    )
    if inp.vae_in_training:  # keep_vae_loaded / vae_cache_ondemand: on the device all the run
        vae_parts = [Part("VAE (kept on the device)", vae), Part("text encoders (host RAM)", host=enc)]
    else:
        vae_parts = [Part("text encoders + VAE (host RAM)", host=enc + vae)]
    train_parts = [
        ctx,
        Part("transformer (frozen)", on_device, note=quant_note or ("group offload" if parked else "")),
        Part("adapter parameters", adapter, note=f"{sum(act.adapter_numels):,} values"),
        Part("gradients", adapter),
        Part("optimizer state", opt, note=inp.optimizer),
        Part(
            "activations",
            act.peak,
            note=f"batch {inp.batch} at {inp.bucket_px[0]}x{inp.bucket_px[1]}, "
            f"checkpointing {'on' if inp.checkpointing else 'off'}",
        ),
        *vae_parts,
        host_parked,
    ]
    if inp.use_ema:
        train_parts.insert(5, Part("EMA copy of the adapter", adapter))
    val_batch = 2 if inp.validation_cfg else 1
    val_tokens = (inp.validation_px[0] // 16) * (inp.validation_px[1] // 16) + inp.text_tokens
    inner = int(inp.transformer_config.get("num_attention_heads", 1)) * int(
        inp.transformer_config.get("attention_head_dim", 1)
    )
    validation = Phase(
        "validation",
        [
            ctx,
            Part("transformer (frozen)", on_device),
            Part("adapter + optimizer state (kept)", 2 * adapter + opt),
            Part("VAE", vae),
            Part(
                "sampling working memory (estimate: 8 hidden states)",
                8 * val_batch * val_tokens * inner * inp.dtype_bytes,
            ),
            Part("VAE decode working memory (estimate)", _vae_working(inp.validation_px, 1, inp)),
            Part("text encoders (host RAM)", host=enc),
            host_parked,
        ],
    )
    settings = {
        "model": f"{inp.family} {inp.flavour}",
        "precision": str(inp.dtype).replace("torch.", ""),
        "base_model_precision": inp.base_precision,
        "gradient_checkpointing": inp.checkpointing,
        "train_batch_size": inp.batch,
        "bucket": f"{inp.bucket_px[0]}x{inp.bucket_px[1]}",
        "optimizer": inp.optimizer,
        "group_offload": dict(inp.group_offload) or None,
        "target": target,
    }
    phases = [load, cache, Phase("training step", train_parts), validation]
    if inp.vae_encodes_in_training:
        phases.insert(3, _encode_in_training(train_parts, inp))
    return MemoryPlan(inp, phases, act, settings)


def _encode_in_training(train_parts: list[Part], inp: PlanInputs) -> Phase:
    """vae_cache_ondemand: a batch's latents are encoded between steps, one image per VAE call, with
    everything the step keeps (weights, adapter, gradients, optimizer state, VAE) resident but not
    its activations."""
    kept = [p for p in train_parts if p.name != "activations"]
    work = _vae_working(inp.bucket_px, 1, inp)
    return Phase("on-demand VAE encode", [*kept, Part("VAE encode working memory (estimate)", work)])


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")
