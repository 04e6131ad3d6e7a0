"""What a plan needs from a config, read without loading a model: family, flavour, transformer
config, component sizes, the largest training bucket, precision and memory settings."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..errors import TuneGraphError
from ..models.prepare import weight_dtype
from .configs import full_size_config, text_tokens
from .weights import HELPER_PARAMS, file_params, folder_params

_ENCODERS = {
    "flux": ["text_encoder", "text_encoder_2"],
    "hidream": [f"text_encoder{s}" for s in ("", "_2", "_3", "_4")],
}


@dataclass(frozen=True)
class PlanInputs:
    family: str
    flavour: str
    transformer_config: dict[str, Any]
    transformer_params: int | None  # from file headers; None: count the meta-built model
    encoder_params: list[int]
    vae_params: int
    bucket_px: tuple[int, int]  # (W, H) of the largest training bucket
    batch: int
    text_tokens: int
    dtype: torch.dtype
    base_precision: str
    encoder_precisions: list[str]
    checkpointing: bool
    optimizer: str
    use_ema: bool
    group_offload: dict[str, Any] = field(default_factory=dict)  # empty: off
    quantize_via: str = "accelerator"
    vae_channels: int = 128  # the VAE's full-resolution width (its working memory scales with it)
    validation_px: tuple[int, int] = (1024, 1024)
    validation_cfg: bool = False  # real CFG doubles the validation batch
    vae_in_training: bool = False  # keep_vae_loaded or vae_cache_ondemand: the VAE stays on the device
    vae_encodes_in_training: bool = False  # vae_cache_ondemand: latents are encoded between steps
    sources: dict[str, str] = field(default_factory=dict)  # where each size came from

    def with_changes(self, **changes: Any) -> PlanInputs:
        return replace(self, **changes)

    @property
    def loads_on_host(self) -> bool:
        """The transformer is quantised / offloaded in host RAM before it reaches the device
        (plan/placement.py), so its full-precision copy never sits on the device."""
        return bool(self.group_offload) or self.quantize_via == "cpu"  # placement.loads_on_host

    @property
    def dtype_bytes(self) -> int:
        return 4 if self.dtype == torch.float32 else 2


def _folder(cfg: Any, key: str) -> Path | None:
    value = getattr(cfg, key, None)
    if not value:
        return None
    p = Path(value).expanduser()
    if not p.is_absolute() and cfg.config_dir is not None and not p.exists():
        p = cfg.config_dir / p
    return p if p.exists() else None


def _tiny_parts(family: str, seed: int) -> dict[str, Any]:
    if family == "flux":
        from ..models.tiny import tiny_flux_parts

        return tiny_flux_parts(seed)
    from ..models.tiny_hidream import tiny_hidream_parts

    return tiny_hidream_parts(seed)


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _sizes(
    cfg: Any, family: str, flavour: str, sources: dict[str, str]
) -> tuple[dict, int | None, list[int], int]:
    """(transformer config, transformer params or None, encoder params, VAE params)."""
    root = _folder(cfg, "pretrained_model_name_or_path")
    if flavour == "tiny" and root is None:
        parts = _tiny_parts(family, int(getattr(cfg, "tiny_model_seed", 0) or 0))
        sources["weights"] = "the tiny models built in code"
        encoders = [_count(parts[n]) for n in _ENCODERS[family]]
        vae = parts["vae"]
        width = int(vae.config.block_out_channels[0])
        return dict(parts["transformer"].config), _count(parts["transformer"]), encoders, _count(vae), width
    helpers = HELPER_PARAMS[family]
    config, t_params = full_size_config(family, flavour), None
    encoders = [helpers[n] for n in _ENCODERS[family]]
    vae = helpers["vae"]
    sources["weights"] = "published full-size configs and parameter counts (no model files given)"
    if root is not None:
        t_dir = root / "transformer"
        if (t_dir / "config.json").exists():
            config = {
                k: v
                for k, v in json.loads((t_dir / "config.json").read_text()).items()
                if not k.startswith("_")
            }
            t_params = folder_params(t_dir)
        encoders = [folder_params(root / n) or p for n, p in zip(_ENCODERS[family], encoders, strict=True)]
        vae = folder_params(root / "vae") or vae
        sources["weights"] = f"safetensors headers under {root}"
    single = _folder(cfg, "pretrained_transformer_model_name_or_path")
    if single is not None and single.is_file():
        t_params = file_params(single)
        sources["transformer"] = f"safetensors header of {single}"
    return config, t_params, encoders, vae, 128


def _bucket(cfg: Any) -> tuple[int, int]:
    """The largest square-equivalent bucket of the enabled datasets (or the config's resolution)."""
    from ..data.buckets import align, bucket_size

    specs = []
    if getattr(cfg, "data_backend_config", None):
        try:
            from ..data.backends import load_backends

            specs = list(load_backends(cfg).datasets)
        except (TuneGraphError, OSError):
            specs = []
    if specs:
        sizes = [bucket_size(1.0, s) for s in specs]
        return max(sizes, key=lambda wh: wh[0] * wh[1])
    res, kind = float(cfg.resolution or 1024), cfg.resolution_type or "pixel_area"
    edge = align(math.sqrt(res * 1e6) if kind == "area" else res)
    return edge, edge


def _on_demand(cfg: Any) -> bool:
    """vae_cache_ondemand / vae_cache_disable in config.json, or on any enabled dataset (cache/ondemand.py)."""
    if getattr(cfg, "vae_cache_ondemand", False) or getattr(cfg, "vae_cache_disable", False):
        return True
    if not getattr(cfg, "data_backend_config", None):
        return False
    try:
        from ..data.backends import load_backends

        return any(s.vae_cache_ondemand for s in load_backends(cfg).datasets)
    except (TuneGraphError, OSError):
        return False


def _validation_px(cfg: Any) -> tuple[int, int]:
    """The largest validation_resolution entry ("1024", "1024x768", comma lists)."""
    sizes = []
    for item in str(cfg.validation_resolution or "1024").split(","):
        w, _, h = item.strip().partition("x")
        try:
            sizes.append((int(float(w)), int(float(h or w))))
        except ValueError:
            continue
    return max(sizes, key=lambda s: s[0] * s[1], default=(1024, 1024))


def group_offload_settings(cfg: Any) -> dict[str, Any]:
    if not getattr(cfg, "enable_group_offload", False):
        return {}
    return {
        "type": cfg.group_offload_type or "block_level",
        "blocks_per_group": int(cfg.group_offload_blocks_per_group or 1),
        "use_stream": bool(cfg.group_offload_use_stream),
        "to_disk": bool(cfg.group_offload_to_disk_path),
    }


def plan_inputs(cfg: Any) -> PlanInputs:
    """Everything the plan reads from `cfg` (files are sized from headers, nothing is loaded)."""
    from ..models.registry import get_family
    from ..quantize import check_precision

    family_cls = get_family(cfg.model_family or "flux")
    family = family_cls.family
    flavour = family_cls.check_flavour(cfg.model_flavour, cfg.source)
    sources: dict[str, str] = {}
    config, t_params, encoders, vae, vae_width = _sizes(cfg, family, flavour, sources)
    tokens = 32 if flavour == "tiny" else text_tokens(family, flavour)
    on_demand = _on_demand(cfg)
    encoder_precisions = [
        check_precision(
            getattr(cfg, f"text_encoder_{i + 1}_precision", None), f"text_encoder_{i + 1}_precision"
        )
        for i in range(len(encoders))
    ]
    return PlanInputs(
        family=family,
        flavour=flavour,
        transformer_config=config,
        transformer_params=t_params,
        encoder_params=encoders,
        vae_params=vae,
        vae_channels=vae_width,
        bucket_px=_bucket(cfg),
        batch=int(cfg.train_batch_size or 1),
        text_tokens=tokens,
        dtype=weight_dtype(cfg),  # what prepare_model loads the weights in
        base_precision=check_precision(cfg.base_model_precision),
        encoder_precisions=encoder_precisions,
        checkpointing=bool(cfg.gradient_checkpointing),
        optimizer=(cfg.optimizer or "adamw_bf16").lower(),
        use_ema=bool(cfg.use_ema),
        group_offload=group_offload_settings(cfg),
        quantize_via=cfg.quantize_via or "accelerator",
        validation_px=_validation_px(cfg),
        validation_cfg=bool(family_cls.guidance_is_cfg or (cfg.validation_guidance_real or 1.0) > 1.0),
        vae_in_training=on_demand or bool(cfg.keep_vae_loaded),
        vae_encodes_in_training=on_demand,
        sources=sources,
    )
