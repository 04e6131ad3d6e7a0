"""LyCORIS adapters (LoKr first) from a SimpleTuner lycoris_config.json, on lycoris-lora 4.x.

Pitfalls handled here (DESIGN.md): `LycorisNetwork.apply_preset` is global class state, so every
network starts from reset defaults; `"Attention"` means the family's attention classes; targets that
match nothing are errors; export never goes through `merge_to()`; full-matrix LoKr files carry no
`alpha` (ComfyUI ignores it today, a rescaling reader must not see lycoris' `alpha = linear_dim`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from lycoris import LycorisNetwork, create_lycoris, create_lycoris_from_weights

from ..errors import ConfigError
from .base import Adapter
from .lycoris_config import check_targets, read_lycoris_config, resolve_preset
from .targets import class_aliases, no_match_error

log = logging.getLogger("tunegraph")
_QUANT_CLASSES = {"QLinear", "Linear8bitLt", "Linear4bit", "Fp8Linear"}  # Fp8Linear: issue 13

# LycorisNetwork's class defaults (lycoris 4.1.3 wrapper.py), restored before every network.
_DEFAULTS = {
    "ENABLE_CONV": True,
    "TARGET_REPLACE_MODULE": ["Linear", "Conv1d", "Conv2d", "Conv3d", "GroupNorm", "LayerNorm"],
    "TARGET_REPLACE_NAME": [],
    "LORA_PREFIX": "lycoris",
    "MODULE_ALGO_MAP": {},
    "NAME_ALGO_MAP": {},
    "USE_FNMATCH": False,
    "TARGET_EXCLUDE_NAME": [],
}


@contextmanager
def quiet_lycoris() -> Iterator[None]:
    """LyCORIS logs INFO lines to stdout; keep stdout for our --json summary."""
    lyco_log = logging.getLogger("LyCORIS")
    level = lyco_log.level
    lyco_log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        lyco_log.setLevel(level)


def is_quantised(model: torch.nn.Module) -> bool:
    """Quantised Linear layers (quanto QLinear, bnb, torchao tensor subclasses) cannot be rebuilt
    as weight + delta; LyCORIS must run them in bypass mode (DESIGN.md)."""
    for m in model.modules():
        if type(m).__name__ in _QUANT_CLASSES:
            return True
        if isinstance(m, torch.nn.Linear) and type(m.weight.data) is not torch.Tensor:
            return True
    return False


def reset_lycoris_presets() -> None:
    """Undo any earlier apply_preset: it writes class attributes shared by every network."""
    for name, value in _DEFAULTS.items():
        setattr(LycorisNetwork, name, json.loads(json.dumps(value)))


class LycorisAdapter(Adapter):
    kind = "lycoris"

    def __init__(self, network: LycorisNetwork, transformer: torch.nn.Module, config: dict[str, Any]):
        self.network = network
        self.config = config
        by_id = {id(m): n for n, m in transformer.named_modules()}
        self.wrapped_module_names = sorted(by_id[id(lora.org_module[0])] for lora in network.loras)

    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.network.parameters())

    def named_parameters(self) -> dict[str, torch.nn.Parameter]:
        return dict(self.network.named_parameters())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Raw parameters (scalar kept separate) plus each module's alpha, for exact resume."""
        state = super().state_dict()
        for lora in self.network.loras:
            state[f"{lora.lora_name}.alpha"] = lora.alpha.detach()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        super().load_state_dict({k: v for k, v in state.items() if not k.endswith(".alpha")})

    def file_tensors(self) -> dict[str, torch.Tensor]:
        return lycoris_file_tensors(self.state_dict())

    def file_metadata(self) -> dict[str, Any]:
        return lycoris_file_metadata(self.config)

    def to(self, device: Any = None, dtype: torch.dtype | None = None) -> LycorisAdapter:
        self.network.to(device=device, dtype=dtype)
        return self

    def remove(self) -> None:
        self.network.restore()

    def restore(self) -> None:
        self.network.apply_to()

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """Multiplier 0, as SimpleTuner does: every module adds exactly zero (bypass or not)."""
        multiplier = self.network.multiplier
        self.network.set_multiplier(0.0)
        try:
            yield
        finally:
            self.network.set_multiplier(multiplier)


def lycoris_file_metadata(config: dict[str, Any]) -> dict[str, Any]:
    args = {k: v for k, v in config.items() if k not in ("apply_preset", "linear_dim", "linear_alpha")}
    return {
        "adapter_kind": "lycoris",
        "adapter_config": config,
        "lycoris_config": config,
        "ss_network_module": "lycoris.kohya",
        "ss_network_dim": str(config.get("linear_dim", 4)),
        "ss_network_alpha": str(config.get("linear_alpha", 1)),
        "ss_network_args": args,
    }


def full_matrix_alpha(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """The `alpha` of a full-matrix LoKr module (lokr_w1 and lokr_w2, no low-rank factor) that every
    reader turns into scale 1: LyCORIS' create_lycoris_from_weights forces scale 1 for such modules
    but needs a number; ComfyUI 0.3.75 ignores it; newer ComfyUI (weight_adapter/lokr.py, checked
    at Comfy-Org/ComfyUI 839df9f) scales by alpha / (w2.out // w1.out), so alpha is that quotient.
    (LyCORIS' own save_weights writes linear_dim there, which such a ComfyUI would apply as a scale.)"""
    return torch.tensor(float(max(1, w2.shape[0] // w1.shape[0])))


def lycoris_file_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Raw training state -> the layout lycoris' save_weights writes (scalar folded into w1 / w1_a),
    with `full_matrix_alpha` on modules with no low-rank factor."""
    modules = sorted({k.rsplit(".", 1)[0] for k in state})
    out: dict[str, torch.Tensor] = {}
    for mod in modules:
        part = {k.rsplit(".", 1)[1]: v for k, v in state.items() if k.rsplit(".", 1)[0] == mod}
        scalar = part.pop("scalar", None)
        for key in ("lokr_w1", "lokr_w1_a"):
            if scalar is not None and key in part:
                part[key] = part[key] * scalar
        if "lokr_w1" in part and "lokr_w2" in part:
            part["alpha"] = full_matrix_alpha(part["lokr_w1"], part["lokr_w2"])
        out.update({f"{mod}.{k}": v for k, v in part.items()})
    return out


def build_lycoris_adapter(transformer: torch.nn.Module, cfg: Any, family_info: Any) -> LycorisAdapter:
    path = cfg.input_path("lycoris_config")
    config = read_lycoris_config(path)
    return lycoris_from_config(transformer, config, family_info, str(path), cfg.init_lokr_norm)


def lycoris_from_config(
    transformer: torch.nn.Module,
    config: dict[str, Any],
    family_info: Any = None,
    src: str = "<lycoris_config>",
    init_lokr_norm: float | None = None,
) -> LycorisAdapter:
    """Freeze `transformer`, build the LyCORIS network from a normalised config, attach it."""
    preset = resolve_preset(config.get("apply_preset") or {}, transformer, class_aliases(family_info))
    check_targets(preset, transformer, src)
    transformer.requires_grad_(False)
    reset_lycoris_presets()
    if preset:
        LycorisNetwork.apply_preset(preset)
    kwargs = {
        k: v
        for k, v in config.items()
        if k not in ("multiplier", "linear_dim", "linear_alpha", "apply_preset")
    }
    if "bypass_mode" not in kwargs and is_quantised(transformer):
        kwargs["bypass_mode"] = True
    try:
        with quiet_lycoris():
            network = create_lycoris(
                transformer,
                config.get("multiplier", 1.0),
                config.get("linear_dim", 4),
                config.get("linear_alpha", 1.0),
                warn_on_unmatched=False,  # check_targets already reported unmatched targets
                **kwargs,
            )
    finally:
        reset_lycoris_presets()
    if not network.loras:
        raise no_match_error(
            "LyCORIS targets (no Linear layers inside them)", [str(preset)], transformer, src
        )
    if init_lokr_norm is not None:
        init_lokr_perturbed_normal(network, init_lokr_norm, src)
    network.apply_to()
    recorded = {
        **config,
        "apply_preset": preset,
        **({"bypass_mode": True} if kwargs.get("bypass_mode") else {}),
    }
    if init_lokr_norm is not None:
        recorded["init_lokr_norm"] = init_lokr_norm
    return LycorisAdapter(network, transformer, recorded)


@torch.no_grad()
def init_lokr_perturbed_normal(network: LycorisNetwork, scale: float, src: str = "") -> None:
    """SimpleTuner's init_lokr_norm: w1 = 1 and w2 = random normal with the base weight's norm,
    std and mean, times `scale`, so the Kronecker product starts near a scaled copy of the weight."""
    for lora in network.loras:
        if not (hasattr(lora, "lokr_w1") and hasattr(lora, "lokr_w2")):
            raise ConfigError(
                f"{src}: init_lokr_norm needs algo 'lokr' with full_matrix true "
                f"(module {lora.lora_name} has no full lokr_w1/lokr_w2)"
            )
        lora.lokr_w1.fill_(1.0)
        base = lora.org_module[0].weight.detach().float()
        noise = torch.randn(lora.lokr_w2.shape, dtype=torch.float32, device=lora.lokr_w2.device)
        noise = noise * (base.norm() / noise.norm())
        noise = noise * (base.std() / noise.std())
        noise = (noise - noise.mean() + base.mean()) * scale
        lora.lokr_w2.copy_(noise.to(lora.lokr_w2.dtype))


def load_lycoris_file(
    tensors: dict[str, torch.Tensor],
    transformer: torch.nn.Module,
    metadata: dict[str, str],
    multiplier: float = 1.0,
) -> LycorisAdapter:
    """Rebuild a LyCORIS network from an exported file's tensors (lycoris' create_lycoris_from_weights)."""
    weights = dict(tensors)
    for mod in {k.rsplit(".", 1)[0] for k in weights}:
        weights.setdefault(f"{mod}.alpha", torch.tensor(1.0))  # full-matrix: scale is 1 whatever alpha
    reset_lycoris_presets()
    transformer.requires_grad_(False)
    with quiet_lycoris():
        network, _ = create_lycoris_from_weights(multiplier, None, transformer, weights_sd=weights)
    expected = {k.rsplit(".", 1)[0] for k in weights}
    loaded = {lora.lora_name for lora in network.loras}
    if loaded != expected:
        missing = sorted(expected - loaded)
        raise ConfigError(
            f"adapter file: {len(missing)} of {len(expected)} lycoris modules match no layer of this model "
            f"(e.g. {missing[:3]}); it was trained for another family or model size"
        )
    if is_quantised(transformer):
        for lora in network.loras:
            lora.bypass_mode = True
    network.apply_to()
    config = json.loads(metadata.get("adapter_config") or metadata.get("lycoris_config") or "{}")
    return LycorisAdapter(network, transformer, config)
