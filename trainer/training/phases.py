"""Memory by phase: only the transformer is resident while training steps run.

The text encoders and the VAE are needed to fill the cache; afterwards the validation prompts (and
the negative prompt) are encoded once, and the loop gets a *training view* of the model: the same
transformer, prompt embeddings looked up from that table, and the VAE only for validation decodes.

- A model the run loaded itself (the CLI) gives its text encoders up: nothing references them any
  more, so their memory is freed, on the GPU and in host RAM alike. Prompts outside the table (the
  web panel's "Validate now" falls back to a training caption) come from the text-embed cache.
- A model handed in (a node's, which ComfyUI keeps for later nodes) keeps them, moved to the CPU
  for the run and put back afterwards (`TrainingView.close`).
- The VAE waits on the CPU between validations unless `keep_vae_loaded` (SimpleTuner's key) keeps
  it on the device, or a dataset encodes its latents during training (`vae_cache_ondemand`: the VAE
  stays on the device, as in SimpleTuner); `offload_during_startup` keeps the text encoders on the CPU while latents are
  cached and the VAE on the CPU while prompts are encoded.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import logging
from collections.abc import Iterator
from typing import Any

import torch

from ..cache.text_embeds import load_embeds
from ..errors import TrainingError
from .prompts import validation_prompts

log = logging.getLogger("tunegraph")


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


@contextlib.contextmanager
def resident(modules: list[torch.nn.Module], device: torch.device | str) -> Iterator[None]:
    """Each module on `device` inside, back where it was after (a no-op where it already is)."""
    moved = [(m, _device_of(m)) for m in modules]
    moved = [(m, home) for m, home in moved if home != torch.device(device)]
    for m, _ in moved:
        torch.nn.Module.to(m, device)  # diffusers' own .to() warns about dtypes on every call
    try:
        yield
    finally:
        for m, home in moved:
            torch.nn.Module.to(m, home)


def offloaded(modules: list[torch.nn.Module], active: bool) -> contextlib.AbstractContextManager:
    """The modules on the CPU inside when `active` (offload_during_startup), else nothing moves."""
    return resident(modules, "cpu") if active and modules else contextlib.nullcontext()


def needs_validation(cfg: Any) -> bool:
    return bool(cfg.validation_prompt or cfg.user_prompt_library) and not cfg.disable_validation


def encode_validation_prompts(cfg: Any, model: Any, instance_prompt: str | None) -> dict[str, dict]:
    """prompt -> embeddings (batch 1, on the CPU) for every validation prompt and the negative one,
    encoded now, while the text encoders are loaded for the cache."""
    texts = [prompt for _, prompt in validation_prompts(cfg, instance_prompt)]
    if cfg.validation_negative_prompt is not None:
        texts.append(cfg.validation_negative_prompt)
    table = {}
    for text in dict.fromkeys(texts):
        table[text] = {k: v.to("cpu") for k, v in model.encode_prompts([text]).items()}
    return table


class PromptTable:
    """`encode_prompts` for the training view: embeddings from the table, on the model's device."""

    def __init__(
        self, table: dict[str, dict], device: torch.device, lender: Any = None, cached: dict | None = None
    ):
        self.table, self.device, self.lender, self.cached = table, device, lender, cached or {}

    def __call__(self, prompts: list[str] | str) -> dict[str, torch.Tensor]:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        for p in prompts:  # a training caption (Validate now's fallback): its embedding is on disk
            if p not in self.table and p in self.cached:
                self.table[p] = load_embeds([self.cached[p]])
        missing = [p for p in prompts if p not in self.table]
        if missing and self.lender is not None:  # a lent model still has its encoders (on the CPU)
            with resident(list(self.lender.text_encoders), self.device):
                return self.lender.encode_prompts(prompts)
        if missing:
            raise TrainingError(
                f"prompt {missing[0]!r} was not encoded before training, and the text encoders are not "
                "loaded while training runs; add it to validation_prompt or user_prompt_library"
            )
        rows = [self.table[p] for p in prompts]
        return {k: torch.cat([r[k] for r in rows]).to(self.device) for k in rows[0]}


class TrainingView:
    """What the loop trains and validates with; `model` is the view (see the module docstring)."""

    def __init__(self, model: Any, restore: list[tuple[torch.nn.Module, torch.device]]):
        self.model, self._restore = model, restore

    def close(self) -> None:
        """Put a handed-in model's components back on the devices they came on."""
        for module, home in self._restore:
            torch.nn.Module.to(module, home)
        self._restore = []


def training_view(
    cfg: Any,
    model: Any,
    instance_prompt: str | None,
    *,
    owned: bool,
    text_paths: dict | None = None,
    encodes_latents: bool = False,
) -> TrainingView:
    """The view of `model` the training loop uses; `owned` says nobody else holds `model` (its text
    encoders may be freed); `text_paths` (caption -> cached embedding file) answers for captions;
    `encodes_latents` (vae_cache_ondemand) keeps the VAE on the device for the whole run."""
    validating = needs_validation(cfg)
    table = encode_validation_prompts(cfg, model, instance_prompt) if validating else {}
    view = copy.copy(model)
    view.text_encoders = []
    view.encode_prompts = PromptTable(table, model.device, None if owned else model, text_paths)
    keep_vae = bool(getattr(cfg, "keep_vae_loaded", False)) or encodes_latents
    view.decode_latents = _decode_with_vae_on_device(view, keep_vae)
    restore: list[tuple[torch.nn.Module, torch.device]] = []
    if not owned:  # the owner keeps them: off the training device for the run, back afterwards
        parked = list(model.text_encoders) + ([] if keep_vae else [model.vae])
        restore = [(m, _device_of(m)) for m in parked]
        for m in parked:
            torch.nn.Module.to(m, "cpu")
    elif not keep_vae:
        torch.nn.Module.to(view.vae, "cpu")
    gc.collect()  # an owned model's encoders are unreferenced once the caller drops `model`
    log.info(
        "training: text encoders %s; VAE %s",
        "freed" if owned else "on the CPU",
        "freed"
        if view.vae is None
        else ("kept on the device" if keep_vae else "on the CPU until validation"),
    )
    return TrainingView(view, restore)


def _decode_with_vae_on_device(view: Any, keep: bool):
    decode = type(view).decode_latents

    def decode_latents(latents: torch.Tensor) -> torch.Tensor:
        with contextlib.nullcontext() if keep else resident([view.vae], view.device):
            return decode(view, latents)

    return decode_latents
