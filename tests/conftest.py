"""Shared fixtures: `comfy`, one real ComfyUI server for the whole test session (tests/comfy_server.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests import comfy_server as a plain module

from comfy_server import ComfyServer, comfy_available  # noqa: E402


@pytest.fixture(scope="session")
def comfy(tmp_path_factory: pytest.TempPathFactory):
    """A started ComfyUI with the pack in custom_nodes/tunegraph; skipped when ComfyUI is missing."""
    if not comfy_available():
        pytest.skip("no ComfyUI: run `make comfyui` or set COMFYUI_DIR")
    base = tmp_path_factory.mktemp("comfy-base")
    server = ComfyServer(base).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def comfy_files(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Issue 13: tiny Flux/HiDream/VAE files written by ComfyUI's own save code (tests/comfy_fixtures.py,
    in a child process), once per session: {family: {format: path}, "dir": folder}."""
    if not comfy_available():
        pytest.skip("no ComfyUI: run `make comfyui` or set COMFYUI_DIR")
    from comfy_fixtures import write_in_child

    return write_in_child(tmp_path_factory.mktemp("comfy-files"))


@pytest.fixture(scope="session")
def comfy_text_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Issue 13: tiny text-encoder files written by ComfyUI's own CLIPSave (tests/text_file_fixtures.py,
    in a child process), once per session: `<encoder>_<format>.safetensors` in the returned folder."""
    if not comfy_available():
        pytest.skip("no ComfyUI: run `make comfyui` or set COMFYUI_DIR")
    from text_file_fixtures import FORMATS, make_text_files

    out = tmp_path_factory.mktemp("comfy-text-files")
    make_text_files(out, FORMATS)
    return out


@pytest.fixture(scope="session")
def tiny_model():
    """Issue 14: `tiny_model(family)` -> that registered family's tiny model (seed 0), built once per
    session on first use and shared by the family tests (tests that train build their own)."""
    from tunegraph.trainer.models import ModelSource, get_family

    built: dict = {}

    def get(family: str):
        if family not in built:
            built[family] = get_family(family).load(ModelSource(flavour="tiny", seed=0))
        return built[family]

    return get


@pytest.fixture(scope="session")
def tiny_folder(tiny_model, tmp_path_factory: pytest.TempPathFactory):
    """Issue 14: `tiny_folder(family)` -> `tiny_model(family)` saved as a diffusers folder named after
    the family, written once per session on first use."""
    saved: dict = {}

    def get(family: str) -> Path:
        if family not in saved:
            saved[family] = tiny_model(family).save_pretrained(tmp_path_factory.mktemp("tiny") / family)
        return saved[family]

    return get
