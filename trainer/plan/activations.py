"""Activation memory, measured: one training forward of the real model code on fake tensors.

The family's transformer is built from its config inside a `FakeTensorMode` (full-size shapes, no
memory), the run's adapter is attached as training attaches it, and the family's own `predict`
plus the loop's loss run under the saved-tensor counter (saved.py) with the target device's
kernels (fake_kernels.py). Nothing is scaled from a smaller model: every bucket shape is its own
fake forward (about a second at full size).

`kept` is what the backward holds at the end of the forward. With gradient checkpointing the
backward also rebuilds one block at a time: `recompute` is the largest block's own saved bytes.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from .fake_kernels import target_kernels
from .moe import fake_routing
from .saved import SavedBytes


@dataclass(frozen=True)
class Activations:
    kept: int  # bytes saved for backward at the end of the forward
    recompute: int  # gradient checkpointing: the largest block, rebuilt during backward (else 0)
    largest_block: int  # the largest block's saved bytes without checkpointing
    batch: int
    image_tokens: int
    text_tokens: int
    adapter_numels: tuple[int, ...] = ()  # the trainable tensors the adapter made (exact)
    adapter_bytes_per_value: int = 4

    @property
    def peak(self) -> int:
        return self.kept + self.recompute

    @property
    def per_token(self) -> float:
        """Bytes kept per image token of one sample (text tokens ride along)."""
        return self.kept / max(1, self.batch * self.image_tokens)

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "adapter_numels"}
        extra = {"adapter_tensors": len(self.adapter_numels), "adapter_values": sum(self.adapter_numels)}
        return {**out, **extra, "peak": self.peak, "per_token": round(self.per_token, 1)}


@dataclass(frozen=True)
class Shape:
    """One training micro-batch: batch x latent height x latent width, and the text length."""

    batch: int
    latent_h: int
    latent_w: int
    text_tokens: int


def count_saved(bundle: Any, shape: Shape, cfg: Any, kernels: Any = contextlib.nullcontext) -> SavedBytes:
    """Run the family's predict (inside `kernels()`: autocast as the loop does) and the loop's loss
    once under the counter. Works on real tensors and, inside a FakeTensorMode, on fake ones."""
    from ..training.flow import flow_target

    transformer = bundle.transformer
    counter = SavedBytes(transformer)
    dev, dt = bundle.device, bundle.dtype
    b = shape.batch
    x0 = torch.zeros(b, bundle.latent_channels, shape.latent_h, shape.latent_w, device=dev)
    noise = torch.zeros_like(x0)
    sigmas = torch.full((b,), 0.5, device=dev)
    embeds = {k: v.to(dev, dt) for k, v in fake_embeds(bundle, b, shape.text_tokens).items()}
    guidance = torch.full((b,), 1.0, device=dev)
    with counter.counting(transformer):
        with kernels():
            pred = bundle.predict(x0.to(dt), sigmas, embeds, guidance)
        loss = torch.nn.functional.mse_loss(pred.float(), flow_target(x0, noise))
        aux = getattr(bundle, "last_aux_loss", None)
        if getattr(cfg, "hidream_use_load_balancing_loss", False) and aux is not None:
            loss = loss + 0.01 * aux.float()
    counter.loss = loss
    return counter


def fake_embeds(bundle: Any, batch: int, tokens: int) -> dict[str, torch.Tensor]:
    """Zero prompt embeddings of the cached shapes, for the transformer's config."""
    c, dev = bundle.transformer.config, bundle.device
    if bundle.family == "flux":
        return {
            "prompt_embeds": torch.zeros(batch, tokens, c.joint_attention_dim, device=dev),
            "pooled_prompt_embeds": torch.zeros(batch, c.pooled_projection_dim, device=dev),
            "prompt_attention_mask": torch.ones(batch, tokens, dtype=torch.long, device=dev),
        }
    t5_dim, llama_dim = c.caption_channels
    layers = len(bundle.cached_llama_layers)
    return {
        "t5_prompt_embeds": torch.zeros(batch, tokens, t5_dim, device=dev),
        "llama_prompt_embeds": torch.zeros(batch, layers, tokens, llama_dim, device=dev),
        "pooled_prompt_embeds": torch.zeros(batch, c.text_emb_dim, device=dev),
    }


def measure(
    family: type,
    transformer_config: dict[str, Any],
    shape: Shape,
    cfg: Any,
    *,
    dtype: torch.dtype,
    target: str,
    checkpointing: bool,
    bypass: bool = False,
    flavour: str = "",
) -> Activations:
    """Activations of one training micro-batch of `shape` for `family` (a ModelBundle class) on
    `target` ("cuda" | "cpu"), with the run's adapter (`cfg`), all on fake tensors."""
    from ..adapters import attach_adapter

    autocast = torch.bfloat16 if dtype == torch.bfloat16 else None  # the loop's rule (loop._autocast)
    with FakeTensorMode(allow_non_fake_inputs=True), torch.device(target):
        transformer = _build(family_transformer(family), transformer_config, dtype)
        bundle = shell_bundle(family, transformer, target, dtype, flavour)
        with _bypass(bypass):
            adapter = attach_adapter(transformer, cfg, family)
        params = adapter.parameters()
        transformer.train()
        largest = _largest_block(bundle, shape, cfg, target, autocast)
        if checkpointing:
            transformer.enable_gradient_checkpointing()
            with fake_routing(transformer):
                kept = count_saved(bundle, shape, cfg, lambda: target_kernels(target, autocast)).total
        else:
            kept = None
    if kept is None:
        kept, recompute = largest[1], 0
    else:
        recompute = largest[0]
    image_tokens = (shape.latent_h // 2) * (shape.latent_w // 2)
    numels = tuple(p.numel() for p in params)
    value_bytes = params[0].element_size() if params else 4
    return Activations(
        kept, recompute, largest[0], shape.batch, image_tokens, shape.text_tokens, numels, value_bytes
    )


def _build(cls: type, config: dict[str, Any], dtype: torch.dtype) -> torch.nn.Module:
    """Construct in `dtype` (fake parameters cannot be cast with .to() afterwards)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return cls.from_config(config)
    finally:
        torch.set_default_dtype(previous)


def _largest_block(bundle, shape, cfg, target, autocast) -> tuple[int, int]:
    """(the largest block's saved bytes, the whole forward's) without checkpointing."""
    with fake_routing(bundle.transformer):
        counter = count_saved(bundle, shape, cfg, lambda: target_kernels(target, autocast))
    blocks = [n for name, n in counter.by_block().items() if name != "outside blocks"]
    return max(blocks, default=0), counter.total


@contextlib.contextmanager
def _bypass(on: bool):
    """LyCORIS runs in bypass mode on a quantised base (adapters/lycoris.py). Its test reads the
    weight's tensor type, which a fake tensor fools: say what the real base would be."""
    from ..adapters import lycoris

    original = lycoris.is_quantised
    lycoris.is_quantised = lambda model: on
    try:
        yield
    finally:
        lycoris.is_quantised = original


def family_transformer(family: type) -> type:
    from diffusers import FluxTransformer2DModel, HiDreamImageTransformer2DModel

    return {"flux": FluxTransformer2DModel, "hidream": HiDreamImageTransformer2DModel}[family.family]


def shell_bundle(family: type, transformer: torch.nn.Module, device: Any, dtype: torch.dtype, flavour: str):
    """A ModelBundle of `family` holding only the transformer: enough for `predict`."""
    bundle = family.__new__(family)
    bundle.transformer, bundle.device, bundle.dtype, bundle.flavour = (
        transformer,
        torch.device(device),
        dtype,
        flavour,
    )
    config = transformer.config
    if family.family == "flux":
        bundle.guidance_embeds = bool(config.guidance_embeds)
        bundle.mask_text_padding = flavour == "libreflux"
    else:
        bundle.llama_layers = [int(i) for i in config.llama_layers]
        bundle.cached_llama_layers = sorted(set(bundle.llama_layers))
        bundle.last_aux_loss = None
        bundle._moe_layers = [m for m in transformer.modules() if type(m).__name__ == "MOEFeedForwardSwiGLU"]
    return bundle
