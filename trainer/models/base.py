"""The model-family protocol: a loaded set of components plus the few family-specific operations.

A family is one subclass of `ModelBundle` in its own file (flux.py, later hidream.py) registered in
`registry.py`. The training loop, data and adapters only use what is defined here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch

from ..config import did_you_mean
from ..errors import ConfigError
from .identity import component_id
from .loading import ModelSource


class ModelBundle:
    """Loaded components of one model family. Subclasses set the class attributes and implement
    `load`, `encode_prompts`, `predict`, `validation_pipeline` and `save_pretrained`."""

    family: ClassVar[str] = ""
    flavours: ClassVar[tuple[str, ...]] = ()
    default_flavour: ClassVar[str] = ""
    default_shift: ClassVar[float] = 3.0
    latent_channels: ClassVar[int] = 16
    lycoris_attention_classes: ClassVar[list[str]] = []
    # issue 15: SimpleTuner's LyCORIS class names -> this family's diffusers classes (adapters/targets.py)
    lycoris_class_aliases: ClassVar[dict[str, list[str]]] = {}
    # issue 15: the diffusers transformer class, and the tiny flavour's builder (meta.py builds either
    # on the meta device to check adapter targets and image sizes before any weight is loaded)
    transformer_class: ClassVar[Any] = None
    tiny_transformer: ClassVar[Any] = None
    # True where the family has no distilled guidance embedding, so validation_guidance means real CFG.
    guidance_is_cfg: ClassVar[bool] = False

    lora_target_presets: ClassVar[dict[str, list[str]]] = {}
    # Hub ids per flavour, only to tell users what to download themselves.
    hub_ids: ClassVar[dict[str, str]] = {}

    def __init__(
        self,
        *,
        flavour: str,
        transformer: torch.nn.Module,
        vae: torch.nn.Module,
        text_encoders: list[torch.nn.Module],
        tokenizers: list[Any],
        noise_scheduler: Any,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        source: ModelSource | None = None,
    ):
        self.flavour = flavour
        self.transformer = transformer
        self.vae = vae
        self.text_encoders = list(text_encoders)
        self.tokenizers = list(tokenizers)
        self.noise_scheduler = noise_scheduler
        self.device = torch.device(device)
        self.dtype = dtype
        self.source = source
        # The VAE and text encoders are never trained here; the transformer is left as loaded
        # (the adapter code freezes it and injects trainable layers).
        for module in [vae, *self.text_encoders]:
            module.requires_grad_(False).eval()
        # Computed now, before any quantisation changes the weights' representation.
        self.vae_id = component_id(f"{self.family}-vae", [vae])
        self.text_encoder_id = component_id(
            f"{self.family}-text", self.text_encoders, self.tokenizers, extra=self._text_id_extra()
        )

    @classmethod
    def image_size_problem(cls, transformer: torch.nn.Module, width: int, height: int) -> str | None:
        """Why the transformer cannot take a `width` x `height` px training image, or None."""
        return None

    def _text_id_extra(self) -> Any:
        """Anything besides weights and vocabularies that changes prompt embeddings."""
        return None

    # -- loading -----------------------------------------------------------------------------------

    @classmethod
    def load(
        cls, source: ModelSource, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ):
        raise NotImplementedError

    @classmethod
    def check_flavour(cls, flavour: str | None, origin: str = "model source") -> str:
        if flavour is None or flavour == "":
            return cls.default_flavour
        if flavour not in cls.flavours:
            raise ConfigError(
                f"{origin}: key 'model_flavour': '{flavour}' is not a {cls.family} flavour"
                f"{did_you_mean(flavour, cls.flavours)}; choose one of {', '.join(cls.flavours)}"
            )
        return flavour

    # -- latents (AutoencoderKL with shift/scale, shared by Flux and HiDream) ----------------------

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] in [-1,1] -> normalised latents [B,C,H/8,W/8] (the posterior mode, so caching
        the same image twice gives the same latents)."""
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"encode_images expects [B,3,H,W] pixels, got shape {tuple(pixels.shape)}")
        vae_dtype = next(self.vae.parameters()).dtype
        z = self.vae.encode(pixels.to(self.device, vae_dtype)).latent_dist.mode()
        config = self.vae.config
        return ((z - (config.shift_factor or 0.0)) * config.scaling_factor).to(self.dtype)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> pixels [B,3,H,W] clamped to [-1,1]."""
        config = self.vae.config
        vae_dtype = next(self.vae.parameters()).dtype
        z = latents.to(self.device, vae_dtype) / config.scaling_factor + (config.shift_factor or 0.0)
        return self.vae.decode(z).sample.clamp(-1, 1)

    # -- family-specific ---------------------------------------------------------------------------

    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def predict(
        self,
        noisy_latents: torch.Tensor,
        sigmas: torch.Tensor,
        embeds: dict[str, torch.Tensor],
        guidance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        raise NotImplementedError

    def validation_pipeline(self) -> Any:
        raise NotImplementedError

    def save_pretrained(self, directory: str | Path) -> Path:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(flavour={self.flavour!r}, device={self.device}, dtype={self.dtype})"


def place_module(module: torch.nn.Module, device: torch.device | str, dtype: torch.dtype) -> torch.nn.Module:
    # Pass dtype to .to() only when it changes: diffusers warns on every dtype cast otherwise.
    if next(module.parameters()).dtype != dtype:
        module = module.to(dtype=dtype)
    return module.to(device=device)


def batch_like(tensor: torch.Tensor, batch: int) -> torch.Tensor:
    if tensor.shape[0] == batch:
        return tensor
    if tensor.shape[0] == 1:
        return tensor.expand(batch, *tensor.shape[1:])
    raise ValueError(f"prompt embeddings have batch {tensor.shape[0]}, latents have batch {batch}")
