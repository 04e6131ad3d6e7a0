"""`tunegraph tiny-models --comfyui DIR` (no ComfyUI needed): what lands in the model folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tunegraph.trainer.cli import main
from tunegraph.trainer.errors import ConfigError
from tunegraph.trainer.models.comfy_keys import UNET_CONFIG_KEY, flux_to_comfy


def test_comfyui_folders_get_comfy_keyed_file_and_diffusers_folder(tmp_path: Path, capsys) -> None:
    assert main(["tiny-models", "--comfyui", str(tmp_path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["comfyui"]
    path = tmp_path / "models" / "diffusion_models" / "tunegraph-tiny-flux.safetensors"
    assert summary["flux"] == str(path)
    assert (tmp_path / "models" / "diffusers" / "tunegraph-tiny-flux" / "model_index.json").is_file()
    with safe_open(str(path), "pt") as f:
        config = json.loads(f.metadata()[UNET_CONFIG_KEY])
        keys = set(f.keys())
        qkv = f.get_tensor("double_blocks.0.img_attn.qkv.weight")
    assert config["image_model"] == "flux" and config["hidden_size"] == qkv.shape[1]
    assert qkv.shape[0] == 3 * qkv.shape[1]  # q, k, v fused as BFL / ComfyUI keep them
    assert "final_layer.adaLN_modulation.1.weight" in keys and not any(
        k.startswith("transformer_") for k in keys
    )


def test_tiny_models_needs_a_destination(capsys) -> None:
    assert main(["tiny-models"]) != 0
    assert "--comfyui" in capsys.readouterr().err


def test_missing_comfyui_folder_is_a_clear_error(tmp_path: Path, capsys) -> None:
    assert main(["tiny-models", "--comfyui", str(tmp_path / "nope")]) != 0
    assert "no such folder" in capsys.readouterr().err


def test_final_norm_shift_scale_swap_and_unknown_keys() -> None:
    scale, shift = torch.ones(2, 3), torch.zeros(2, 3)
    out = flux_to_comfy({"norm_out.linear.weight": torch.cat([scale, shift])})
    assert torch.equal(out["final_layer.adaLN_modulation.1.weight"], torch.cat([shift, scale]))
    with pytest.raises(ConfigError, match="no mapping"):
        flux_to_comfy({"something.else.weight": torch.zeros(1)})
