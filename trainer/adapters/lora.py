"""PEFT LoRA adapters (`lora_type: standard`), attached and reloaded through diffusers' PEFT integration.

Export folds `lora_alpha / rank` into `lora_B` and records `lora_alpha = rank`: ComfyUI applies no
alpha to diffusers-format keys (scale 1), diffusers reads the recorded config, so both give the
trained outputs whatever alpha was trained with.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import torch
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer

from ..config import did_you_mean
from ..errors import ConfigError
from .base import Adapter
from .targets import lora_target_presets, no_match_error, suffix_matches

log = logging.getLogger("tunegraph")
ADAPTER_NAME = "default"
INIT_TYPES = {"default": True, "gaussian": "gaussian"}
PREFIX = "transformer"


class PeftLoraAdapter(Adapter):
    kind = "lora"

    def __init__(
        self, transformer: torch.nn.Module, config: dict[str, Any], adapter_name: str = ADAPTER_NAME
    ):
        self.transformer = transformer
        self.config = config
        self.adapter_name = adapter_name
        self.wrapped_module_names = sorted(
            n for n, m in transformer.named_modules() if isinstance(m, BaseTunerLayer) and n
        )

    def named_parameters(self) -> dict[str, torch.nn.Parameter]:
        """PEFT-format names (`<module>.lora_A.weight`), no adapter name, as get_peft_model_state_dict."""
        tag = f".{self.adapter_name}."
        return {
            name.replace(tag, "."): p
            for name, p in self.transformer.named_parameters()
            if tag in name and (".lora_A." in name or ".lora_B." in name)
        }

    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.named_parameters().values())

    def file_tensors(self) -> dict[str, torch.Tensor]:
        return lora_file_tensors(self.state_dict(), self.config["rank"], self.config["alpha"])

    def file_metadata(self) -> dict[str, Any]:
        return lora_file_metadata(self.config)

    def remove(self) -> None:
        self.transformer.disable_adapters()

    def restore(self) -> None:
        self.transformer.enable_adapters()


def lora_targets(cfg: Any, family_info: Any) -> list[str]:
    presets = lora_target_presets(family_info)
    name = cfg.flux_lora_target or "all"
    if name not in presets:  # the family has fewer presets than the key accepts (HiDream: no tiny/nano)
        raise ConfigError(
            f"{cfg.source}: flux_lora_target '{name}' is not one of {', '.join(presets)}{did_you_mean(name, presets)}"
        )
    return list(presets[name])


def peft_config(config: dict[str, Any]) -> LoraConfig:
    return LoraConfig(
        r=config["rank"],
        lora_alpha=config["alpha"],
        target_modules=config["target_modules"],
        init_lora_weights=INIT_TYPES[config["init"]],
        lora_dropout=config.get("dropout", 0.0),
    )


def build_lora_adapter(transformer: torch.nn.Module, cfg: Any, family_info: Any) -> PeftLoraAdapter:
    init = cfg.lora_init_type or "default"
    if init not in INIT_TYPES:
        raise ConfigError(
            f"{cfg.source}: lora_init_type '{init}' is not supported yet; use 'default' or 'gaussian'"
        )
    rank = int(cfg.lora_rank)
    if rank < 1:
        raise ConfigError(f"{cfg.source}: key 'lora_rank' must be at least 1, got {rank}")
    config = {
        "rank": rank,
        "alpha": float(cfg.lora_alpha) if cfg.lora_alpha is not None else float(rank),
        "target_modules": lora_targets(cfg, family_info),
        "init": init,
        "dropout": float(cfg.lora_dropout or 0.0),
        "flux_lora_target": cfg.flux_lora_target,
    }
    return lora_from_config(transformer, config, cfg.source)


def lora_from_config(
    transformer: torch.nn.Module, config: dict[str, Any], src: str = "<config>"
) -> PeftLoraAdapter:
    """Freeze `transformer` and add a PEFT LoRA adapter. Every target name must match a Linear: a name
    that matches nothing is an error (SimpleTuner's HiDream list names `to_out.0`, which HiDream does
    not have, and silently trains less)."""
    linears = [n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)]
    targets = config["target_modules"]
    unmatched = [t for t in targets if not any(suffix_matches(t, n) for n in linears)]
    if unmatched:
        raise no_match_error("LoRA target modules", unmatched, transformer, src)
    transformer.requires_grad_(False)
    transformer.add_adapter(peft_config(config), adapter_name=ADAPTER_NAME)
    return PeftLoraAdapter(transformer, config)


def lora_file_tensors(state: dict[str, torch.Tensor], rank: int, alpha: float) -> dict[str, torch.Tensor]:
    """PEFT state -> diffusers file keys (`transformer.<module>.lora_A.weight`), alpha/rank in lora_B."""
    scale = float(alpha) / float(rank)
    out = {}
    for key, value in state.items():
        if ".lora_B." in key and scale != 1.0:
            value = value * scale
        out[f"{PREFIX}.{key}"] = value
    return out


def _diffusers_lora_config(config: dict[str, Any]) -> dict[str, Any]:
    """What diffusers' save_lora_weights records: the LoraConfig fields, alpha folded to rank."""
    return {
        "r": config["rank"],
        "lora_alpha": config["rank"],
        "target_modules": sorted(config["target_modules"]),
        "lora_dropout": 0.0,
        "bias": "none",
        "use_dora": False,
        "init_lora_weights": True,
    }


def lora_file_metadata(config: dict[str, Any]) -> dict[str, Any]:
    packed = {f"{PREFIX}.{k}": v for k, v in _diffusers_lora_config(config).items()}
    return {
        "adapter_kind": "lora",
        "adapter_config": config,
        "lora_adapter_metadata": json.dumps(packed, indent=2, sort_keys=True),
    }


def load_lora_file(
    tensors: dict[str, torch.Tensor], transformer: torch.nn.Module, metadata: dict[str, str]
) -> PeftLoraAdapter:
    """Load a diffusers-format LoRA file onto `transformer` with diffusers' own loader."""
    packed = json.loads(metadata["lora_adapter_metadata"]) if "lora_adapter_metadata" in metadata else None
    transformer.requires_grad_(False)
    transformer.load_lora_adapter(dict(tensors), prefix=PREFIX, adapter_name=ADAPTER_NAME, metadata=packed)
    config = json.loads(metadata.get("adapter_config") or "{}")
    if not config:
        lora_b = [v for k, v in tensors.items() if ".lora_B." in k]
        config = {"rank": int(lora_b[0].shape[1]), "target_modules": [], "init": "default"}
    # the file's tensors already carry alpha/rank: the loaded adapter runs at scale 1
    config = {**config, "alpha": float(config["rank"])}
    return PeftLoraAdapter(transformer, config)
