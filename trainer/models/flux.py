"""Flux.1: CLIP-L (pooled) + T5 (sequence) text encoders, a 16-channel VAE, and an MMDiT transformer
that sees latents as a sequence of 2x2 patches with 3-axis RoPE ids.

Timesteps go to the transformer as sigmas in [0,1] (diffusers' FluxTransformer2DModel multiplies by
1000 inside, as does FluxPipeline's `timestep / 1000`); guidance goes in as the raw scale (e.g. 1.0
or 3.5) and is likewise scaled inside, only when the transformer has guidance embeddings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from ..choices import FLUX_LORA_TARGET_PRESETS
from ..errors import ConfigError
from .base import ModelBundle, batch_like, place_module
from .loading import ModelSource, apply_overrides, folder_flavour, load_folder_parts, save_pipeline_folder
from .single_file import checkpoint_parts, source_flavour
from .text_encoder_source import files_only_parts, plan_text_encoder_files
from .tiny import tiny_flux_parts, tiny_flux_transformer


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B,C,h,w] -> [B,(h/2)(w/2),4C]: each 2x2 patch becomes one token (channel-major, as diffusers)."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of `pack_latents` for a latent of height h and width w."""
    b, _, d = tokens.shape
    x = tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, h, w)


def latent_image_ids(rows: int, cols: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[rows*cols, 3] RoPE ids: axis 0 is 0 (text/image index), axes 1 and 2 are row and column."""
    ids = torch.zeros(rows, cols, 3, device=device)
    ids[..., 1] = torch.arange(rows, device=device)[:, None]
    ids[..., 2] = torch.arange(cols, device=device)[None, :]
    return ids.reshape(rows * cols, 3).to(dtype)


class FluxModel(ModelBundle):
    family: ClassVar[str] = "flux"
    flavours: ClassVar[tuple[str, ...]] = (
        "krea",
        "dev",
        "schnell",
        "kontext",
        "fluxbooru",
        "libreflux",
        "tiny",
    )
    default_flavour: ClassVar[str] = "krea"
    default_shift: ClassVar[float] = 3.0
    default_guidance: ClassVar[float] = 1.0  # SimpleTuner's flux_guidance_value default
    lycoris_attention_classes: ClassVar[list[str]] = ["FluxAttention"]
    # issue 15: SimpleTuner's Flux code uses diffusers' FeedForward itself (ff, ff_context).
    lycoris_class_aliases: ClassVar[dict[str, list[str]]] = {"FeedForward": ["FeedForward"]}
    transformer_class: ClassVar[Any] = FluxTransformer2DModel
    tiny_transformer: ClassVar[Any] = staticmethod(lambda: tiny_flux_transformer(True))
    # flux_lora_target -> PEFT module-name suffixes (SimpleTuner's meanings), from choices.py.
    lora_target_presets: ClassVar[dict[str, list[str]]] = FLUX_LORA_TARGET_PRESETS
    hub_ids: ClassVar[dict[str, str]] = {
        "krea": "black-forest-labs/FLUX.1-Krea-dev",
        "dev": "black-forest-labs/FLUX.1-dev",
        "schnell": "black-forest-labs/FLUX.1-schnell",
        "kontext": "black-forest-labs/FLUX.1-Kontext-dev",
        "fluxbooru": "terminusresearch/fluxbooru-v0.3",
        "libreflux": "jimmycarter/LibreFLUX",
    }

    def __init__(self, **parts: Any):
        # Fixed per model: embeddings of one family always have the same length (cache-friendly).
        clip_tok, t5_tok = parts["tokenizers"]
        self.clip_max_length = int(min(clip_tok.model_max_length, 77))
        t5_cap = 256 if parts["flavour"] == "schnell" else 512
        self.max_sequence_length = int(min(t5_tok.model_max_length, t5_cap))
        self.guidance_embeds = bool(parts["transformer"].config.guidance_embeds)
        # LibreFLUX was de-distilled with T5 padding masked out of attention.
        self.mask_text_padding = parts["flavour"] == "libreflux"
        super().__init__(**parts)

    def _text_id_extra(self) -> Any:
        return [self.clip_max_length, self.max_sequence_length]

    # -- loading -----------------------------------------------------------------------------------

    @classmethod
    def load(
        cls, source: ModelSource, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> FluxModel:
        """Tiny models built in code (flavour "tiny" and no folder), else a local diffusers folder;
        `pretrained_transformer/vae_model_name_or_path` replace those components."""
        root = source.folder("pretrained_model_name_or_path", cls.hub_ids.get(source.flavour or "krea"))
        flavour = cls.check_flavour(
            source.flavour or folder_flavour(root) or source_flavour(cls.family, source), source.origin
        )
        checkpoint = source.weights_file("pretrained_model_name_or_path")  # an all-in-one file
        # text_encoder_N_path, checked before any weight loads (a checkpoint's own come with its parts)
        text_files = plan_text_encoder_files(cls.family, source) if checkpoint is None else None
        if root is not None:
            parts = cls._load_folder(root, dtype, source.origin)
        elif checkpoint is not None:
            parts = checkpoint_parts(cls.family, checkpoint, dtype, source)
        elif flavour == "tiny":
            parts = tiny_flux_parts(source.seed)
        elif (files := files_only_parts(cls.family, source, flavour)) is not None:
            parts = files
        else:
            raise ConfigError(
                f"{source.origin}: key 'pretrained_model_name_or_path' is not set. TuneGraph never downloads "
                f"weights: download {cls.hub_ids.get(flavour, 'the model')} yourself and set the key to the "
                "local diffusers folder, or use model_flavour 'tiny' for the built-in test model."
            )
        apply_overrides(parts, source, dtype, FluxTransformer2DModel, cls.family, device)
        parts.update(text_files.load(dtype) if text_files else {})
        for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
            parts[name] = place_module(parts[name], device, dtype)
        return cls(
            flavour=flavour,
            transformer=parts["transformer"],
            vae=parts["vae"],
            text_encoders=[parts["text_encoder"], parts["text_encoder_2"]],
            tokenizers=[parts["tokenizer"], parts["tokenizer_2"]],
            noise_scheduler=parts["scheduler"],
            device=device,
            dtype=dtype,
            source=source,
        )

    @staticmethod
    def _load_folder(root: Path, dtype: torch.dtype, origin: str) -> dict[str, Any]:
        classes = {
            "transformer": FluxTransformer2DModel,
            "vae": AutoencoderKL,
            "text_encoder": CLIPTextModel,
            "text_encoder_2": T5EncoderModel,
            "tokenizer": CLIPTokenizer,
            "tokenizer_2": T5TokenizerFast,
            "scheduler": FlowMatchEulerDiscreteScheduler,
        }
        hint = "point the key at a complete local Flux diffusers folder (model_index.json, transformer/, vae/, text_encoder/, ...)."
        return load_folder_parts(root, classes, dtype, origin, lambda name: hint)

    # -- prompts -----------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """{"prompt_embeds": [B,L,D] (T5), "pooled_prompt_embeds": [B,P] (CLIP pooled),
        "prompt_attention_mask": [B,L] (1 = real token)}. Long prompts are truncated."""
        if isinstance(prompts, str):
            prompts = [prompts]
        clip_tok, t5_tok = self.tokenizers
        clip, t5 = self.text_encoders
        clip_ids = clip_tok(
            list(prompts),
            padding="max_length",
            max_length=self.clip_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        pooled = clip(clip_ids.to(self.device), output_hidden_states=False).pooler_output
        t5_in = t5_tok(
            list(prompts),
            padding="max_length",
            max_length=self.max_sequence_length,
            truncation=True,
            return_tensors="pt",
        )
        embeds = t5(t5_in.input_ids.to(self.device), output_hidden_states=False)[0]
        return {
            "prompt_embeds": embeds.to(self.dtype),
            "pooled_prompt_embeds": pooled.to(self.dtype),
            "prompt_attention_mask": t5_in.attention_mask.to(self.device),
        }

    # -- the training forward ----------------------------------------------------------------------

    def predict(
        self,
        noisy_latents: torch.Tensor,
        sigmas: torch.Tensor,
        embeds: dict[str, torch.Tensor],
        guidance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Flow-matching model output for noisy latents [B,C,h,w] at `sigmas` [B] (0 clean, 1 noise).
        `guidance` [B] is the distilled guidance scale (default `default_guidance`); ignored by
        models without guidance embeddings (schnell). Embeds of batch 1 are broadcast."""
        b, c, h, w = noisy_latents.shape
        if c != self.latent_channels or h % 2 or w % 2:
            raise ValueError(
                f"Flux latents must be [B,{self.latent_channels},h,w] with even h and w (images a multiple of "
                f"16 px), got {tuple(noisy_latents.shape)}"
            )
        dev, dt = self.device, self.dtype
        text = batch_like(embeds["prompt_embeds"], b).to(dev, dt)
        pooled = batch_like(embeds["pooled_prompt_embeds"], b).to(dev, dt)
        timestep = sigmas.to(dev, dt).reshape(-1).expand(b)
        if self.guidance_embeds:
            guidance = torch.full((b,), self.default_guidance) if guidance is None else guidance
            guidance = guidance.to(dev, torch.float32).reshape(-1).expand(b)
        else:
            guidance = None
        img_ids = latent_image_ids(h // 2, w // 2, dev, dt)
        txt_ids = torch.zeros(text.shape[1], 3, device=dev, dtype=dt)
        out = self.transformer(
            hidden_states=pack_latents(noisy_latents.to(dev, dt)),
            encoder_hidden_states=text,
            pooled_projections=pooled,
            timestep=timestep,
            img_ids=img_ids,
            txt_ids=txt_ids,
            guidance=guidance,
            joint_attention_kwargs=self._attention_kwargs(embeds, b, img_ids.shape[0]),
            return_dict=False,
        )[0]
        return unpack_latents(out, h, w)

    def _attention_kwargs(self, embeds: dict, batch: int, image_tokens: int) -> dict | None:
        mask = embeds.get("prompt_attention_mask")
        if not self.mask_text_padding or mask is None:
            return None
        text_mask = batch_like(mask, batch).to(self.device).bool()
        full = torch.cat([text_mask, text_mask.new_ones(batch, image_tokens)], dim=1)
        return {"attention_mask": full[:, None, None, :]}  # text tokens come first in joint attention

    # -- sampling and saving -----------------------------------------------------------------------

    def validation_pipeline(self) -> FluxPipeline:
        """A FluxPipeline over the loaded components (no second load), with its own scheduler copy.
        Call it with `max_sequence_length=model.max_sequence_length` to match training embeddings."""
        clip, t5 = self.text_encoders
        clip_tok, t5_tok = self.tokenizers
        return FluxPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler.from_config(self.noise_scheduler.config),
            vae=self.vae,
            text_encoder=clip,
            tokenizer=clip_tok,
            text_encoder_2=t5,
            tokenizer_2=t5_tok,
            transformer=self.transformer,
        )

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write a diffusers Flux folder that `FluxModel.load` (and FluxPipeline) reloads exactly."""
        return save_pipeline_folder(self.validation_pipeline(), directory, self.family, self.flavour)
