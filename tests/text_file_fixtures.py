"""ComfyUI-format text-encoder files of the tiny models, written by ComfyUI's own CLIPSave.

`make_text_files(out_dir)` builds the tiny Flux and HiDream text encoders (seed 0, as `tiny`
loads them), hands their weights to `python -m comfy_text_reference save` in a child process and
returns {fixture name: ComfyUI config dict} with `<name>_<format>.safetensors` (and ComfyUI's
reference outputs beside) in `out_dir`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from comfy_server import COMFY_DIR
from safetensors.torch import save_file

from tunegraph.trainer.models.tiny import tiny_flux_parts
from tunegraph.trainer.models.tiny_hidream import tiny_hidream_parts

# fixture name -> (family parts, component, kind)
ENCODERS = {
    "flux_clip_l": ("flux", "text_encoder", "clip_l"),
    "flux_t5": ("flux", "text_encoder_2", "t5"),
    "hidream_clip_l": ("hidream", "text_encoder", "clip_l"),
    "hidream_clip_g": ("hidream", "text_encoder_2", "clip_g"),
    "hidream_t5": ("hidream", "text_encoder_3", "t5"),
    "hidream_llama": ("hidream", "text_encoder_4", "llama"),
}
FORMATS = {  # what the tests use (the fp8 ones compared with ComfyUI's forward)
    "flux": ["fp32", "bf16", "fp16", "fp8_e4m3fn", "fp8_e5m2", "scaled_fp8"],
    "hidream": ["fp32", "bf16", "fp8_e4m3fn", "scaled_fp8"],
}
# Inside every tiny vocabulary, as long as the tiny CLIPs' positions (ComfyUI's CLIP wants them all).
IDS = [[0, 5, 17, 9, 30] + [1] * 27, [0, 3] + [1] * 30]


def tiny_parts() -> dict:
    return {"flux": tiny_flux_parts(0), "hidream": tiny_hidream_parts(0)}


def comfy_weights(module: torch.nn.Module, kind: str) -> dict[str, torch.Tensor]:
    """The encoder's weights under the names ComfyUI's modules use (transformers 4's)."""
    sd = {k: v.detach().float().contiguous() for k, v in module.state_dict().items()}
    if kind == "llama":
        return {k: v for k, v in sd.items() if k.startswith("model.")}
    if kind == "t5":
        return {k: v for k, v in sd.items() if k != "encoder.embed_tokens.weight"}
    if not any(k.startswith("text_model.") for k in sd):  # Flux's CLIPTextModel: no level, no projection
        sd = {f"text_model.{k}": v for k, v in sd.items()}
        g = torch.Generator().manual_seed(7)
        width = module.config.hidden_size
        sd["text_projection.weight"] = torch.randn(module.config.projection_dim, width, generator=g)
    return sd


def comfy_config(module: torch.nn.Module, kind: str) -> dict:
    c = module.config
    if kind.startswith("clip"):
        keys = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "vocab_size",
                "max_position_embeddings", "projection_dim", "hidden_act", "eos_token_id")  # fmt: skip
        return {k: getattr(c, k) for k in keys}
    if kind == "t5":  # ComfyUI names T5 v1.1's tanh-approximated GELU by torch's name
        return {**c.to_dict(), "dense_act_fn": "gelu_pytorch_tanh"}
    rope = getattr(c, "rope_parameters", None) or {"rope_theta": c.rope_theta}
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "head_dim")  # fmt: skip
    return {**{k: getattr(c, k) for k in keys}, "rope_theta": rope["rope_theta"]}


def make_text_files(out_dir: Path, formats: dict[str, list[str]] | None = None) -> dict[str, dict]:
    """`formats`: {family: [format, ...]} (default: every format ComfyUI can write)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = tiny_parts()
    entries = []
    for name, (family, component, kind) in ENCODERS.items():
        module = parts[family][component]
        weights_path = out_dir / f"{name}.source.safetensors"
        save_file(comfy_weights(module, kind), str(weights_path))
        entry = {"name": name, "kind": kind, "weights": str(weights_path), "ids": IDS,
                 "config": comfy_config(module, kind)}  # fmt: skip
        if formats:
            entry["formats"] = formats[family]
        entries.append(entry)
    job = out_dir / "job.json"
    job.write_text(json.dumps({"encoders": entries}))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    cmd = [sys.executable, "-m", "comfy_text_reference", "save", str(COMFY_DIR), str(job), str(out_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {e["name"]: e for e in entries}
