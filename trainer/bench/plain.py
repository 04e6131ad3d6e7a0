"""The baseline: a plain diffusers + LyCORIS training step, written the way the diffusers example
scripts do it, with no TuneGraph code (straight create_lycoris, torch AdamW, autocast bf16).

It draws noise and sigmas from a generator seeded as ours (noise first, then a logit-normal sigma,
shifted by SHIFT), so on the same base weights step 1's loss must equal ours: that checks our
packing, ids, timestep scaling, guidance and HiDream's sign convention against diffusers' own.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import FluxPipeline
from lycoris import LycorisNetwork, create_lycoris

from .cases import ATTENTION_CLASS, LOKR, SHIFT, Case
from .timing import Timing, time_steps


def _flux_pred(
    transformer: torch.nn.Module, xt: torch.Tensor, sigma: torch.Tensor, embeds: dict
) -> torch.Tensor:
    b, c, h, w = xt.shape
    dev = xt.device
    packed = FluxPipeline._pack_latents(xt, b, c, h, w)
    img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, dev, xt.dtype)
    text = embeds["prompt_embeds"].to(dev)
    out = transformer(
        hidden_states=packed,
        encoder_hidden_states=text,
        pooled_projections=embeds["pooled_prompt_embeds"].to(dev),
        timestep=sigma.to(dev),
        img_ids=img_ids,
        txt_ids=torch.zeros(text.shape[1], 3, device=dev, dtype=xt.dtype),
        guidance=torch.full((b,), 1.0, device=dev),
        return_dict=False,
    )[0]
    return FluxPipeline._unpack_latents(out, h * 8, w * 8, 8)


def _hidream_pred(
    transformer: torch.nn.Module, xt: torch.Tensor, sigma: torch.Tensor, embeds: dict
) -> torch.Tensor:
    b, c, h, w = xt.shape
    dev, layers = xt.device, transformer.config.llama_layers
    cached = sorted(set(layers))
    llama = embeds["llama_prompt_embeds"].to(dev)  # [B, len(cached), L, D]
    by_layer = [llama[:, cached.index(i)] if i in cached else None for i in range(max(layers) + 1)]
    out = transformer(
        hidden_states=xt,
        timesteps=sigma.to(dev) * 1000,
        encoder_hidden_states_t5=embeds["t5_prompt_embeds"].to(dev),
        encoder_hidden_states_llama3=by_layer,
        pooled_embeds=embeds["pooled_prompt_embeds"].to(dev),
        return_dict=False,
    )[0]
    p = transformer.config.patch_size  # train-mode output is [B, C, tokens, p*p]
    out = out.reshape(b, c, h // p, w // p, p, p).permute(0, 1, 2, 4, 3, 5).reshape(b, c, h, w)
    return -out  # HiDream predicts x0 - noise; the pipeline negates it


PREDICT = {"flux": _flux_pred, "hidream": _hidream_pred}


def plain_step(
    transformer: torch.nn.Module,
    case: Case,
    batch: dict[str, Any],
    *,
    seed: int,
    lr: float,
    bypass: bool,
    warmup: int,
    steps: int,
) -> tuple[Timing, int]:
    """Time the plain step; returns (timing, trainable params). The network is removed afterwards."""
    device = next(transformer.parameters()).device
    transformer.requires_grad_(False).train()
    if case.checkpointing:
        transformer.enable_gradient_checkpointing()
    torch.manual_seed(seed)
    LycorisNetwork.apply_preset({"target_module": [ATTENTION_CLASS[case.family]]})
    quantised = case.precision != "bf16"  # quantised bases need bypass mode (no weight to merge into)
    lyco_log = logging.getLogger("LyCORIS")
    level = lyco_log.level
    lyco_log.setLevel(logging.WARNING)  # its INFO lines go to stdout, where our table goes
    network = create_lycoris(
        transformer,
        LOKR["multiplier"],
        LOKR["linear_dim"],
        LOKR["linear_alpha"],
        algo="lokr",
        factor=LOKR["factor"],
        full_matrix=True,
        use_scalar=True,
        **({"bypass_mode": True} if bypass or quantised else {}),
    )
    lyco_log.setLevel(level)
    network.apply_to()
    network.to(device)
    optimizer = torch.optim.AdamW(network.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    x0 = batch["latents"].to(device)
    predict = PREDICT[case.family]

    def step() -> float:
        noise = torch.randn(batch["latents"].shape, generator=gen).to(device)
        s = torch.sigmoid(torch.randn(x0.shape[0], generator=gen))
        sigma = (SHIFT * s / (1 + (SHIFT - 1) * s)).to(device)
        xt = ((1 - sigma[:, None, None, None]) * x0 + sigma[:, None, None, None] * noise).to(torch.bfloat16)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            pred = predict(transformer, xt, sigma, batch["embeds"])
        loss = F.mse_loss(pred.float(), noise - x0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    try:
        timing = time_steps(step, device, warmup, steps)
        trainable = sum(p.numel() for p in network.parameters())
    finally:
        network.restore()
        transformer.disable_gradient_checkpointing()
    return timing, trainable
