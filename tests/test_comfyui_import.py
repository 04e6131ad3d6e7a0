"""The pack imports cleanly in a real ComfyUI (0.3.75 from `make comfyui`, or the user's COMFYUI_DIR)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMFY = Path(os.environ.get("COMFYUI_DIR", ROOT / ".comfyui" / "ComfyUI"))

pytestmark = pytest.mark.skipif(
    not (COMFY / "main.py").exists(), reason="no ComfyUI: run `make comfyui` or set COMFYUI_DIR"
)


def test_pack_imports_without_failure(tmp_path: Path) -> None:
    base = tmp_path / "comfy-base"
    (base / "custom_nodes").mkdir(parents=True)
    (base / "custom_nodes" / "tunegraph").symlink_to(ROOT, target_is_directory=True)
    proc = subprocess.run(
        [sys.executable, "main.py", "--cpu", "--quick-test-for-ci", "--base-directory", str(base)],
        cwd=COMFY,
        capture_output=True,
        text=True,
        timeout=300,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "custom_nodes/tunegraph" in log, log[-3000:]  # ComfyUI really saw the pack
    bad = [
        line
        for line in log.splitlines()
        if "tunegraph" in line and ("IMPORT FAILED" in line or "Error" in line)
    ]
    assert not bad, "\n".join(bad)
    assert "comfy_entrypoint" not in log, log[-3000:]
