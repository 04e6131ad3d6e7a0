"""Headless queueing as the README shows it: comfy-cli's `run --workflow ... --wait` on a bundled
workflow, against the real server (comfy-cli runs offline against an existing ComfyUI folder)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from comfy_server import ROOT

COMFY_CLI = Path(sys.executable).parent / "comfy"


@pytest.mark.skipif(not COMFY_CLI.exists() and not shutil.which("comfy"), reason="comfy-cli not installed")
def test_comfy_cli_runs_the_bundled_tiny_workflow(comfy, tmp_path: Path) -> None:
    workflow = ROOT / "workflows" / "flux" / "tiny_train_lokr.api.json"
    env = {**os.environ, "HOME": str(tmp_path)}  # a throwaway HOME: comfy-cli keeps its state there
    proc = subprocess.run(
        [str(COMFY_CLI if COMFY_CLI.exists() else "comfy"), "--workspace", str(comfy.comfy_dir), "--json",
         "run", "--workflow", str(workflow), "--wait", "--host", "127.0.0.1", "--port", str(comfy.port),
         "--where", "local", "--timeout", "240"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    envelope = json.loads(proc.stdout.strip().splitlines()[-1])
    assert envelope["ok"] and envelope["data"]["status"] == "completed", envelope
    assert "5" in envelope["data"]["executed_node_ids"] or "5" in envelope["data"]["cached_node_ids"]
    assert (comfy.base_dir / "models" / "loras" / "tunegraph" / "tiny_lokr.safetensors").exists()
