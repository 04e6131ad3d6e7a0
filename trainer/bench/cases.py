"""What the benchmark measures: the case grid, model sizes, token counts and the MFU formula.

Full size is what users train (Flux.1-dev 11.9B, HiDream-I1 17.1B, random weights); `smoke` swaps in
the tiny test configs so the very same code path runs on a CPU in seconds (the CI test).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

FAMILIES = ("flux", "hidream")
PRECISIONS = ("bf16", "int8-torchao", "int8-quanto", "nf4-bnb")
FULL_RESOLUTIONS = (512, 1024)
SMOKE_RESOLUTIONS = (32, 64)
SMOKE_PRECISIONS = ("bf16", "int8-torchao")  # every precision also runs on CPU, just slower
ATTENTION_CLASS = {"flux": "FluxAttention", "hidream": "HiDreamAttention"}
SHIFT = 3.0  # fixed flow shift (no auto shift) so the plain step can draw the same sigmas

# The quickstart's LoKr (reference-configs/hidream/lycoris_config.attention.json): factor 16, full
# matrix, on attention. use_scalar starts the delta at zero, so step 1's loss is the base model's.
LOKR = {
    "algo": "lokr",
    "multiplier": 1.0,
    "linear_dim": 16384,
    "linear_alpha": 1,
    "full_matrix": True,
    "use_scalar": True,
    "factor": 16,
    "apply_preset": {"target_module": ["Attention"], "module_algo_map": {"Attention": {"factor": 16}}},
}


def transformer_config(family: str, smoke: bool) -> dict[str, Any]:
    """Constructor kwargs of the family's diffusers transformer (full size, or the tiny test model)."""
    if family == "flux":
        if smoke:
            return {
                "in_channels": 64,
                "num_layers": 1,
                "num_single_layers": 1,
                "attention_head_dim": 16,
                "num_attention_heads": 2,
                "joint_attention_dim": 32,
                "pooled_projection_dim": 32,
                "guidance_embeds": True,
                "axes_dims_rope": (4, 6, 6),
            }
        return {"guidance_embeds": True}  # diffusers' defaults are Flux.1-dev's, bar the guidance embedder
    if smoke:
        from ..models.tiny_hidream import tiny_hidream_transformer

        return {k: v for k, v in tiny_hidream_transformer().config.items() if not k.startswith("_")}
    from ..plan.configs import full_size_config

    return full_size_config("hidream", "full")


def text_tokens(family: str, smoke: bool) -> int:
    """Prompt length the transformer sees: Flux's T5 512 tokens, HiDream's 128 (tiny models: 32)."""
    return 32 if smoke else {"flux": 512, "hidream": 128}[family]


@dataclass(frozen=True)
class Case:
    family: str
    resolution: int
    precision: str
    checkpointing: bool

    @property
    def base_model_precision(self) -> str:
        return "no_change" if self.precision == "bf16" else self.precision

    @property
    def image_tokens(self) -> int:
        return (self.resolution // 16) ** 2  # 8x VAE, then 2x2 patches

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def grid(
    families: tuple[str, ...] = FAMILIES,
    resolutions: tuple[int, ...] = FULL_RESOLUTIONS,
    precisions: tuple[str, ...] = PRECISIONS,
    checkpointing: tuple[bool, ...] = (True, False),
) -> list[Case]:
    """Every combination, grouped by (family, precision) so one built base model serves a group."""
    return [
        Case(f, r, p, c) for f in families for p in precisions for r in resolutions for c in checkpointing
    ]


# Dense bf16 tensor-core peaks (no sparsity), from the vendors' datasheets, by device-name substring.
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "RTX 4090": 165.0,
}


def peak_tflops(device_name: str) -> float | None:
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in device_name:
            return value
    return None


def model_flops(active_params: int, tokens: int, batch: int = 1) -> float:
    """Approximate FLOPs of one training step: 6 * active params * tokens (the usual convention:
    2 for the forward, 4 for the backward). Adapter training skips the base weight gradients (~4NT)
    but recomputes the forward with checkpointing (+2NT); attention's own FLOPs are not counted."""
    return 6.0 * active_params * tokens * batch


def mfu(active_params: int, tokens: int, seconds: float | None, peak: float | None) -> float | None:
    """Model-FLOP utilisation = model_flops / step seconds / peak FLOP/s (None without a peak)."""
    if not seconds or not peak:
        return None
    return model_flops(active_params, tokens) / seconds / (peak * 1e12)
