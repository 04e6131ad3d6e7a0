"""HiDream-I1: four text encoders, the Flux VAE and a mixture-of-experts MMDiT.

Facts checked against diffusers 0.42 (HiDreamImageTransformer2DModel, HiDreamImagePipeline):

- Timesteps: the transformer embeds the raw timestep, so it takes t = sigma * 1000 (the pipeline passes
  the scheduler's timesteps). `predict` takes sigmas in [0,1] like Flux and scales them.
- Sign: the pipeline negates the transformer output (`noise_pred = -noise_pred`) before the Euler step,
  so the raw output is x0 - noise. `predict` returns the negation: noise - x0, Flux's convention.
- MoE: in eval mode, or with `force_inference_output`, the routed experts run in `moe_infer` under
  `torch.no_grad`: no gradient reaches them, the router, or anything before them through them.
  `predict` therefore switches every MoE layer to diffusers' differentiable (training) path; both
  paths compute the same function. The output layout (tokens in train mode, an image in eval mode)
  is handled either way.
- Non-square latents are padded to `max_seq` = prod(max_resolution) / 4 tokens, with the padding's
  keys zeroed (not masked out of the softmax) exactly as in the pipeline, so we let the transformer
  patchify. Larger non-square inputs are an error; square inputs have no limit.
- Text: CLIP-L and CLIP-G projected pooled outputs, concatenated; T5 hidden states; Llama hidden
  states after each layer (`hidden_states[1:]`), of which block i reads layer `llama_layers[i]`. All
  padded to `max_sequence_length` (128 for the real model, T5 capped there) with no text mask.
- Load-balancing loss (`hidream_use_load_balancing_loss`): diffusers computes the MoE auxiliary loss
  and drops it (SimpleTuner detaches it). Here every grad-enabled `predict` sets
  `model.last_aux_loss` (None when the transformer has no MoE): the mean over MoE layers of
  sum_e P_e * f_e (mean router probability times normalised top-k load; 1.0 when balanced), a tensor
  that carries gradient to the router and to everything before it. The loop adds
  `hidream_load_balancing_loss_weight * model.last_aux_loss` to the loss; `predict(...,
  return_aux=True)` returns `(prediction, aux)` for the same value.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, HiDreamImagePipeline, HiDreamImageTransformer2DModel
from transformers import (
    AutoTokenizer,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    LlamaForCausalLM,
    T5EncoderModel,
)

from ..errors import ConfigError
from .base import ModelBundle, batch_like, place_module
from .loading import ModelSource, apply_overrides, folder_flavour, load_folder_parts, save_pipeline_folder
from .single_file import checkpoint_parts, source_flavour
from .text_encoder_source import files_only_parts, plan_text_encoder_files
from .tiny_hidream import hidream_scheduler, tiny_hidream_parts, tiny_hidream_transformer

FLAVOUR_SHIFTS = {"full": 3.0, "dev": 6.0, "fast": 3.0, "tiny": 3.0}
_ATTN_IMAGE = ["to_q", "to_k", "to_v", "to_out"]
_ATTN_TEXT = ["to_q_t", "to_k_t", "to_v_t", "to_out_t"]
_FF_TEXT = ["ff_t.w1", "ff_t.w2", "ff_t.w3"]
_FF_SHARED = ["shared_experts.w1", "shared_experts.w2", "shared_experts.w3"]
_LLAMA_HINT = (
    "diffusers' HiDream docs load Llama-3.1-8B-Instruct separately: copy or symlink it (e.g. "
    "meta-llama/Llama-3.1-8B-Instruct) into '{root}/text_encoder_4' and its tokenizer into "
    "'{root}/tokenizer_4', as HiDreamImagePipeline.save_pretrained lays them out."
)


class HiDreamValidationPipeline(HiDreamImagePipeline):
    """HiDreamImagePipeline that renders at the requested height and width, in eval mode.

    The stock `__call__` rescales every request to an area of `default_sample_size`² (1024² px); and
    a transformer left in train mode returns tokens, not latents. Both are fixed per call here."""

    def __call__(self, *args: Any, height: int | None = None, width: int | None = None, **kwargs: Any):
        if height and width:
            # A hair above the exact area so the pipeline's floor(size * scale / 16) keeps the size.
            self.default_sample_size = math.sqrt(height * width) / self.vae_scale_factor * (1 + 1e-9)
        was_training = self.transformer.training
        self.transformer.eval()
        try:
            return super().__call__(*args, height=height, width=width, **kwargs)
        finally:
            self.transformer.train(was_training)


class HiDreamModel(ModelBundle):
    family: ClassVar[str] = "hidream"
    flavours: ClassVar[tuple[str, ...]] = ("full", "dev", "fast", "tiny")
    default_flavour: ClassVar[str] = "full"
    lycoris_attention_classes: ClassVar[list[str]] = ["HiDreamAttention"]
    # issue 15: SimpleTuner's HiDream class names (its models/hidream/transformer.py) -> diffusers'.
    lycoris_class_aliases: ClassVar[dict[str, list[str]]] = {
        "FeedForward": ["HiDreamImageFeedForwardSwiGLU"],  # every expert (shared, routed) and ff_t
        "MOEFeedForward": ["MOEFeedForwardSwiGLU"],
        "EmbedND": ["HiDreamImageEmbedND"],
        "PatchEmbed": ["HiDreamImagePatchEmbed"],
        "PooledEmbed": ["HiDreamImagePooledEmbed"],
        "TimestepEmbed": ["HiDreamImageTimestepEmbed"],
        "OutEmbed": ["HiDreamImageOutEmbed"],
        "HiDreamImageBlock": ["HiDreamBlock"],
    }
    transformer_class: ClassVar[Any] = HiDreamImageTransformer2DModel
    tiny_transformer: ClassVar[Any] = staticmethod(tiny_hidream_transformer)
    guidance_is_cfg: ClassVar[bool] = True
    # PEFT suffixes; HiDream has `to_out`, not Flux's `to_out.0` (SimpleTuner's default misses it).
    lora_target_presets: ClassVar[dict[str, list[str]]] = {
        "mmdit": _ATTN_IMAGE,  # image-stream attention (double and single blocks)
        "all": _ATTN_IMAGE + _ATTN_TEXT,  # both streams' attention
        "all+ffs": _ATTN_IMAGE + _ATTN_TEXT + _FF_TEXT + _FF_SHARED,  # plus text and shared-expert FFNs
        "context": _ATTN_TEXT,
        "context+ffs": _ATTN_TEXT + _FF_TEXT,
    }
    hub_ids: ClassVar[dict[str, str]] = {
        "full": "HiDream-ai/HiDream-I1-Full",
        "dev": "HiDream-ai/HiDream-I1-Dev",
        "fast": "HiDream-ai/HiDream-I1-Fast",
    }

    def __init__(self, **parts: Any):
        self.default_shift = FLAVOUR_SHIFTS[parts["flavour"]]
        config = parts["transformer"].config
        t5_tok, llama_tok = parts["tokenizers"][2], parts["tokenizers"][3]
        llama_tok.pad_token = llama_tok.eos_token  # as HiDreamImagePipeline does
        # The pipeline's lengths: T5 and Llama capped by their tokenizers, CLIP at 218.
        self.max_sequence_length = int(min(128, t5_tok.model_max_length, llama_tok.model_max_length))
        self.clip_max_length = min(self.max_sequence_length, 218)
        self.llama_layers = [int(i) for i in config.llama_layers]
        self.cached_llama_layers = sorted(set(self.llama_layers))  # only what the blocks read
        self.last_aux_loss: torch.Tensor | None = None
        super().__init__(**parts)
        self._moe_layers = [
            m for m in self.transformer.modules() if type(m).__name__ == "MOEFeedForwardSwiGLU"
        ]

    def _text_id_extra(self) -> Any:
        return [self.clip_max_length, self.max_sequence_length, self.cached_llama_layers]

    # -- loading -----------------------------------------------------------------------------------

    @classmethod
    def load(
        cls, source: ModelSource, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> HiDreamModel:
        """Tiny models built in code (flavour "tiny" and no folder), else a local diffusers folder
        with text_encoder_4/ and tokenizer_4/ inside; transformer and VAE overrides as for Flux."""
        root = source.folder("pretrained_model_name_or_path", cls.hub_ids.get(source.flavour or "full"))
        flavour = cls.check_flavour(
            source.flavour or folder_flavour(root) or source_flavour(cls.family, source), source.origin
        )
        checkpoint = source.weights_file("pretrained_model_name_or_path")  # an all-in-one file
        # text_encoder_N_path, checked before any weight loads (a checkpoint's own come with its parts)
        text_files = plan_text_encoder_files(cls.family, source) if checkpoint is None else None
        if root is not None:
            parts = _load_folder(root, dtype, source.origin)
        elif checkpoint is not None:
            parts = checkpoint_parts(cls.family, checkpoint, dtype, source)
        elif flavour == "tiny":
            parts = tiny_hidream_parts(source.seed)
        elif (files := files_only_parts(cls.family, source, flavour)) is not None:
            parts = files
        else:
            raise ConfigError(
                f"{source.origin}: key 'pretrained_model_name_or_path' is not set. TuneGraph never downloads "
                f"weights: download {cls.hub_ids.get(flavour, 'the model')} (plus Llama-3.1-8B-Instruct as "
                "text_encoder_4) yourself and set the key to the local diffusers folder, or use "
                "model_flavour 'tiny' for the built-in test model."
            )
        apply_overrides(parts, source, dtype, HiDreamImageTransformer2DModel, cls.family, device)
        parts.update(text_files.load(dtype) if text_files else {})
        encoders = ["text_encoder", "text_encoder_2", "text_encoder_3", "text_encoder_4"]
        for name in ["transformer", "vae", *encoders]:
            parts[name] = place_module(parts[name], device, dtype)
        return cls(
            flavour=flavour,
            transformer=parts["transformer"],
            vae=parts["vae"],
            text_encoders=[parts[n] for n in encoders],
            tokenizers=[parts[n.replace("text_encoder", "tokenizer")] for n in encoders],
            noise_scheduler=hidream_scheduler(FLAVOUR_SHIFTS[flavour]),
            device=device,
            dtype=dtype,
            source=source,
        )

    # -- prompts -----------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """{"t5_prompt_embeds": [B,L,D_t5], "llama_prompt_embeds": [B,n,L,D_llama] (the n distinct
        layers in `cached_llama_layers`), "pooled_prompt_embeds": [B,P] (CLIP-L ‖ CLIP-G)}, in the
        model dtype (bf16 in real runs). Long prompts are truncated."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        clip_l, clip_g, t5, llama = self.text_encoders
        tok_l, tok_g, tok_t5, tok_llama = self.tokenizers
        pooled = torch.cat(
            [self._clip_pooled(tok_l, clip_l, prompts), self._clip_pooled(tok_g, clip_g, prompts)], -1
        )
        ids, mask = self._tokenize(tok_t5, prompts, self.max_sequence_length)
        t5_embeds = t5(ids, attention_mask=mask)[0]
        ids, mask = self._tokenize(tok_llama, prompts, self.max_sequence_length)
        hidden = llama(ids, attention_mask=mask, output_hidden_states=True).hidden_states[1:]
        llama_embeds = torch.stack([hidden[i] for i in self.cached_llama_layers], dim=1)
        return {
            "t5_prompt_embeds": t5_embeds.to(self.dtype),
            "llama_prompt_embeds": llama_embeds.to(self.dtype),
            "pooled_prompt_embeds": pooled.to(self.dtype),
        }

    def _tokenize(self, tokenizer: Any, prompts: list[str], length: int) -> tuple[torch.Tensor, torch.Tensor]:
        out = tokenizer(
            prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt"
        )
        return out.input_ids.to(self.device), out.attention_mask.to(self.device)

    def _clip_pooled(self, tokenizer: Any, encoder: torch.nn.Module, prompts: list[str]) -> torch.Tensor:
        ids, _ = self._tokenize(tokenizer, prompts, self.clip_max_length)
        return encoder(ids)[0]  # text_embeds: the projected pooled output

    # -- the training forward ----------------------------------------------------------------------

    def predict(
        self,
        noisy_latents: torch.Tensor,
        sigmas: torch.Tensor,
        embeds: dict[str, torch.Tensor],
        guidance: torch.Tensor | None = None,
        *,
        return_aux: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        """Flow-matching velocity (noise - x0) for noisy latents [B,16,h,w] at `sigmas` [B] in [0,1].
        `guidance` is ignored: HiDream has no guidance embedding (CFG is real CFG, in the sampler).
        Embeds of batch 1 are broadcast. Sets `last_aux_loss` (see the module docstring)."""
        b, c, h, w = noisy_latents.shape
        self._check_latents(noisy_latents.shape)
        dev, dt = self.device, self.dtype
        llama = batch_like(embeds["llama_prompt_embeds"], b).to(dev, dt)
        llama_by_layer = {layer: llama[:, i] for i, layer in enumerate(self.cached_llama_layers)}
        for m in self._moe_layers:  # the differentiable MoE path, whatever train/eval mode says
            m.training, m._force_inference_output = True, False
        gates: list[tuple] = []
        hooks = [m.gate.register_forward_hook(_aux_hook(gates)) for m in self._moe_layers]
        try:
            out = self.transformer(
                hidden_states=noisy_latents.to(dev, dt),
                timesteps=sigmas.to(dev, torch.float32).reshape(-1).expand(b) * 1000,  # fp32, as the pipeline
                encoder_hidden_states_t5=batch_like(embeds["t5_prompt_embeds"], b).to(dev, dt),
                encoder_hidden_states_llama3=llama_by_layer,
                pooled_embeds=batch_like(embeds["pooled_prompt_embeds"], b).to(dev, dt),
                return_dict=False,
            )[0]
        finally:
            for hook in hooks:
                hook.remove()
        losses = [_balance_loss(*g) for g in gates]
        self.last_aux_loss = torch.stack(losses).mean() if losses else None
        pred = -self._to_image(out, h, w)
        return (pred, self.last_aux_loss) if return_aux else pred

    @classmethod
    def image_size_problem(cls, transformer: torch.nn.Module, width: int, height: int) -> str | None:
        """HiDream pads non-square inputs to `max_seq` patches, so larger ones cannot train or sample."""
        p, max_seq = transformer.config.patch_size, transformer.max_seq
        patches = (height // 8 // p) * (width // 8 // p)
        if height == width or patches <= max_seq:
            return None
        px = int(math.sqrt(max_seq)) * p * 8
        return (
            f"{width}x{height} px is {patches} patches; HiDream takes non-square images of at most "
            f"{max_seq} patches ({px}x{px} px in area)"
        )

    def _check_latents(self, shape: torch.Size) -> None:
        b, c, h, w = shape
        p = self.transformer.config.patch_size
        if c != self.latent_channels or h % p or w % p:
            raise ValueError(
                f"HiDream latents must be [B,{self.latent_channels},h,w] with h and w multiples of {p} (images "
                f"a multiple of 16 px), got {tuple(shape)}"
            )
        max_seq = self.transformer.max_seq
        if h != w and (h // p) * (w // p) > max_seq:
            px = int(math.sqrt(max_seq)) * p * 8
            raise ValueError(
                f"HiDream takes non-square images of at most {max_seq} patches ({px}x{px} px in area); "
                f"got latents {h}x{w} ({(h // p) * (w // p)} patches). Lower the resolution."
            )

    def _to_image(self, out: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """The transformer's output as [B,C,h,w]: in train mode it is [B,C,tokens,p*p] (tokens padded
        to max_seq for non-square input), in eval mode already an image."""
        if not self.transformer.training or self.transformer.config.force_inference_output:
            return out
        p = self.transformer.config.patch_size
        b, c = out.shape[:2]
        tokens = out[:, :, : (h // p) * (w // p)].reshape(b, c, h // p, w // p, p, p)
        return tokens.permute(0, 1, 2, 4, 3, 5).reshape(b, c, h, w)

    # -- sampling and saving -----------------------------------------------------------------------

    def sampling_sigmas(
        self, latent_h: int, latent_w: int, steps: int, shift: float | None = None
    ) -> torch.Tensor:
        """The sigmas HiDreamImagePipeline steps through (steps + 1 values ending in 0): the
        scheduler's default spacing with a fixed shift, whatever the size."""
        scheduler = hidream_scheduler(self.default_shift if shift is None else shift)
        scheduler.set_timesteps(steps, device="cpu")
        return scheduler.sigmas.float()

    def validation_pipeline(self, shift: float | None = None) -> HiDreamValidationPipeline:
        """A pipeline over the loaded components (no second load) that honours height/width, with a
        flow-matching Euler scheduler at `shift` (default: the flavour's). Call it with
        `max_sequence_length=model.max_sequence_length`; guidance_scale > 1 is real CFG."""
        return self._pipeline(HiDreamValidationPipeline, shift)

    def _pipeline(self, cls: type, shift: float | None = None) -> Any:
        clip_l, clip_g, t5, llama = self.text_encoders
        tok_l, tok_g, tok_t5, tok_llama = self.tokenizers
        return cls(
            scheduler=hidream_scheduler(self.default_shift if shift is None else shift),
            vae=self.vae,
            text_encoder=clip_l,
            tokenizer=tok_l,
            text_encoder_2=clip_g,
            tokenizer_2=tok_g,
            text_encoder_3=t5,
            tokenizer_3=tok_t5,
            text_encoder_4=llama,
            tokenizer_4=tok_llama,
            transformer=self.transformer,
        )

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write a diffusers HiDream folder (text_encoder_4 inside) that `HiDreamModel.load` and
        stock HiDreamImagePipeline reload exactly."""
        return save_pipeline_folder(
            self._pipeline(HiDreamImagePipeline), directory, self.family, self.flavour
        )


def embed_bytes_per_caption(
    t5_dim: int = 4096,
    llama_dim: int = 4096,
    tokens: int = 128,
    llama_layers: list[int] | None = None,
    pooled_dim: int = 2048,
    bytes_per_value: int = 2,
) -> int:
    """Bytes of one cached caption as `encode_prompts` stores it (defaults: full-size HiDream-I1,
    whose 48 blocks read the 32 Llama layers [0..31, 31, ...], in bf16)."""
    layers = llama_layers if llama_layers is not None else list(range(32)) + [31] * 16
    values = tokens * t5_dim + len(set(layers)) * tokens * llama_dim + pooled_dim
    return values * bytes_per_value


def _aux_hook(sink: list[tuple]):
    """Forward hook on a MoEGate: keep its input and top-k choice. The loss is computed after the
    forward, outside any gradient-checkpointed block, so recomputation sees the same graph."""

    def hook(gate: torch.nn.Module, args: tuple, output: tuple) -> None:
        sink.append((gate, args[0], output[0]))

    return hook


def _balance_loss(gate: torch.nn.Module, hidden: torch.Tensor, topk_idx: torch.Tensor) -> torch.Tensor:
    """diffusers' MoEGate auxiliary loss (seq_aux off) without alpha, with gradient: sum over experts
    of mean router probability times normalised top-k load (1.0 when perfectly balanced)."""
    scores = F.linear(hidden.reshape(-1, hidden.shape[-1]), gate.weight).float().softmax(dim=-1)
    load = F.one_hot(topk_idx.reshape(-1), gate.n_routed_experts).float().mean(0)
    return (scores.mean(0) * load * gate.n_routed_experts).sum()


def _load_folder(root: Path, dtype: torch.dtype, origin: str) -> dict[str, Any]:
    classes = {
        "transformer": HiDreamImageTransformer2DModel,
        "vae": AutoencoderKL,
        "text_encoder": CLIPTextModelWithProjection,
        "text_encoder_2": CLIPTextModelWithProjection,
        "text_encoder_3": T5EncoderModel,
        "text_encoder_4": LlamaForCausalLM,
        "tokenizer": CLIPTokenizer,
        "tokenizer_2": CLIPTokenizer,
        "tokenizer_3": AutoTokenizer,
        "tokenizer_4": AutoTokenizer,
    }

    def hint(name: str) -> str:
        if name.endswith("_4"):
            return _LLAMA_HINT.format(root=root)
        return (
            "point the key at a complete local HiDream diffusers folder (model_index.json, "
            "transformer/, vae/, text_encoder/ ... text_encoder_4/)."
        )

    return load_folder_parts(root, classes, dtype, origin, hint)
