"""Random-init transformers built straight on the device, and a synthetic batch to train on.

The transformer is constructed on the `meta` device (no memory), cast there, then allocated on the
target device with `to_empty` and filled in place: a 17B model never passes through host RAM and
never exists in fp32. The bundle around it is the real FluxModel / HiDreamModel, with the tiny text
encoders and VAE (never run: the batch already holds latents and prompt embeddings).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from accelerate import init_empty_weights
from diffusers import FluxTransformer2DModel, HiDreamImageTransformer2DModel

from ..models.flux import FluxModel
from ..models.hidream import HiDreamModel
from ..models.tiny import tiny_flux_parts
from ..models.tiny_hidream import tiny_hidream_parts
from .cases import Case, text_tokens, transformer_config

TRANSFORMERS = {"flux": FluxTransformer2DModel, "hidream": HiDreamImageTransformer2DModel}


@torch.no_grad()
def init_random(module: torch.nn.Module, seed: int) -> None:
    """Deterministic random weights on the module's own device: matrices N(0, 1/fan_in), biases 0,
    1-D scales 1. The same seed gives the same weights on the same device."""
    for i, (name, p) in enumerate(sorted(module.named_parameters())):
        gen = torch.Generator(device=p.device).manual_seed(seed * 100_003 + i)
        if p.ndim >= 2:
            fan_in = p.numel() // p.shape[0]
            p.normal_(0.0, 1.0 / math.sqrt(fan_in), generator=gen)
        elif name.endswith("bias"):
            p.zero_()
        else:
            p.fill_(1.0)


def build_transformer(
    family: str, smoke: bool, device: torch.device, dtype: torch.dtype = torch.bfloat16, seed: int = 0
) -> torch.nn.Module:
    """The family's diffusers transformer with random weights, allocated directly on `device`."""
    with init_empty_weights(include_buffers=False):
        model = TRANSFORMERS[family](**transformer_config(family, smoke))
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}  # to_empty drops their values
    torch.nn.Module.to(model, dtype=dtype)  # on meta: free; diffusers' own .to() warns
    model.to_empty(device=device)
    init_random(model, seed)
    for name, value in buffers.items():
        owner, _, leaf = name.rpartition(".")
        getattr(model.get_submodule(owner), leaf).copy_(value.to(device))
    return model.train()


def active_params(transformer: torch.nn.Module) -> int:
    """Parameters one token goes through: a MoE's routed experts count k/E of their weights."""
    config = transformer.config
    routed = getattr(config, "num_routed_experts", None)
    total = 0
    for name, p in transformer.named_parameters():
        share = config.num_activated_experts / routed if routed and ".experts." in name else 1.0
        total += int(p.numel() * share)
    return total


def build_bundle(family: str, transformer: torch.nn.Module, smoke: bool, device: torch.device, dtype):
    """The real model bundle (its `predict` is what our step runs) around the built transformer."""
    if family == "flux":
        parts = tiny_flux_parts(0)
        cls, flavour = FluxModel, "tiny" if smoke else "dev"
        encoders = [parts["text_encoder"], parts["text_encoder_2"]]
        tokenizers = [parts["tokenizer"], parts["tokenizer_2"]]
    else:
        parts = tiny_hidream_parts(0)
        cls, flavour = HiDreamModel, "tiny" if smoke else "full"
        names = ["text_encoder", "text_encoder_2", "text_encoder_3", "text_encoder_4"]
        encoders = [parts[n] for n in names]
        tokenizers = [parts[n.replace("text_encoder", "tokenizer")] for n in names]
    return cls(
        flavour=flavour,
        transformer=transformer,
        vae=parts["vae"],
        text_encoders=encoders,
        tokenizers=tokenizers,
        noise_scheduler=parts["scheduler"],
        device=device,
        dtype=dtype,
    )


def synthetic_batch(case: Case, transformer: torch.nn.Module, smoke: bool, seed: int = 0) -> dict[str, Any]:
    """One cached-style batch (batch 1): latents [1,16,h,w] fp32 and prompt embeddings of the shapes
    the family's text encoders give, in bf16, on the CPU (as the cache loads them)."""
    gen = torch.Generator().manual_seed(seed)
    config, tokens, side = transformer.config, text_tokens(case.family, smoke), case.resolution // 8

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(torch.bfloat16)

    latents = torch.randn(1, 16, side, side, generator=gen)
    if case.family == "flux":
        embeds = {
            "prompt_embeds": randn(1, tokens, config.joint_attention_dim),
            "pooled_prompt_embeds": randn(1, config.pooled_projection_dim),
            "prompt_attention_mask": torch.ones(1, tokens, dtype=torch.long),
        }
    else:
        t5_dim, llama_dim = config.caption_channels
        layers = len(set(config.llama_layers))
        embeds = {
            "t5_prompt_embeds": randn(1, tokens, t5_dim),
            "llama_prompt_embeds": randn(1, layers, tokens, llama_dim),
            "pooled_prompt_embeds": randn(1, config.text_emb_dim),
        }
    return {"latents": latents, "embeds": embeds}


class SyntheticData:
    """What the loop needs of TrainingData (next_batch, state, len, epoch), serving one fixed batch."""

    def __init__(self, batch: dict[str, Any]):
        self.batch, self.epoch, self.position = batch, 0, 0
        self.instance_prompt: str | None = None

    def __len__(self) -> int:
        return 1

    def next_batch(self) -> dict[str, Any]:
        self.position += 1
        return self.batch

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = int(state["position"])
