"""Issue 13: training from ComfyUI's own model files through the real server.

Tiny ComfyUI-format files (written by ComfyUI's own ModelSave/CLIPSave, see comfy_fixtures.py and
text_file_fixtures.py) are put in the test server's models folders: LoadTrainingModel lists them in
the same lists the stock loaders show, trains from them, and writes a run config that replays from
the command line.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from comfy_server import ROOT

from tunegraph.trainer.config import load_config
from tunegraph.trainer.models import load_model

pytestmark = pytest.mark.comfyui

FILES = {  # (folder in models/, name there) -> fixture
    ("diffusion_models", "tg_tiny_flux.safetensors"): ("model", "bf16"),
    ("vae", "tg_tiny_ae.safetensors"): ("model", "vae"),
    ("text_encoders", "tg_tiny_clip_l.safetensors"): ("text", "flux_clip_l_bf16"),
    ("clip", "tg_tiny_t5xxl_fp8_scaled.safetensors"): ("text", "flux_t5_scaled_fp8"),  # the old folder name
}


@pytest.fixture(scope="module")
def installed(comfy, comfy_files, comfy_text_files) -> dict[str, str]:
    for (folder, name), (kind, what) in FILES.items():
        src = Path(comfy_files["flux"][what]) if kind == "model" else comfy_text_files / f"{what}.safetensors"
        (comfy.base_dir / "models" / folder).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, comfy.base_dir / "models" / folder / name)
    return {folder: name for folder, name in FILES}


def test_object_info_lists_comfyui_model_files(comfy, installed) -> None:
    spec = comfy.object_info()["TuneGraphLoadTrainingModel"]["input"]["required"]
    options = {
        name: spec[name][1]["options"]
        for name in ("diffusion_model", "vae", "text_encoder_1", "text_encoder_4")
    }
    assert (
        options["diffusion_model"][0] == "none" and "tg_tiny_flux.safetensors" in options["diffusion_model"]
    )
    assert "tg_tiny_ae.safetensors" in options["vae"]
    for slot in ("text_encoder_1", "text_encoder_4"):  # models/text_encoders and models/clip both listed
        assert {"tg_tiny_clip_l.safetensors", "tg_tiny_t5xxl_fp8_scaled.safetensors"} <= set(options[slot])


def test_trains_from_comfyui_files_and_replays_from_cli(comfy, installed) -> None:
    wf = json.loads((ROOT / "workflows" / "flux" / "tiny_train_lokr.api.json").read_text())
    wf["2"]["inputs"].update(
        model_flavour="dev", diffusion_model="tg_tiny_flux.safetensors", vae="tg_tiny_ae.safetensors",
        text_encoder_1="tg_tiny_clip_l.safetensors", text_encoder_2="tg_tiny_t5xxl_fp8_scaled.safetensors",
    )  # fmt: skip
    wf["5"]["inputs"].update(steps=2, output_name="files_run", checkpoint_interval=0)
    wf["7"]["inputs"]["name"] = "files_run"
    messages = comfy.run(wf, 300)
    done = [m for m in messages if m["type"] in ("execution_success", "execution_error")][-1]
    assert done["type"] == "execution_success", done
    assert (comfy.base_dir / "models" / "loras" / "tunegraph" / "files_run.safetensors").is_file()

    # the run config names the same files and the ComfyUI the tokenizers come from: the CLI replays it
    config_path = comfy.base_dir / "output" / "tunegraph" / "files_run" / "config" / "config.json"
    config = json.loads(config_path.read_text())
    models = comfy.base_dir / "models"
    assert (
        Path(config["pretrained_transformer_model_name_or_path"])
        == models / "diffusion_models" / installed["diffusion_models"]
    )
    assert Path(config["text_encoder_2_path"]) == models / "clip" / installed["clip"]
    assert Path(config["comfyui_path"], "comfy").is_dir() and "pretrained_model_name_or_path" not in config
    bundle = load_model(load_config(config_path), dtype=torch.float32)
    assert [type(m).__name__ for m in bundle.text_encoders] == ["CLIPTextModel", "T5EncoderModel"]
    assert bundle.flavour == "dev" and bundle.transformer.config.guidance_embeds
