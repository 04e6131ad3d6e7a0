"""The live training panel in a real browser: Debian chromium + playwright-core (tests/web/) against
the real ComfyUI frontend served by the test server. Skipped only outside CI when chromium or
node_modules/playwright-core is missing (`make browser-deps` installs both)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from comfy_server import ROOT

pytestmark = pytest.mark.comfyui

CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
SCRIPT = ROOT / "tests" / "web" / "train_panel.mjs"
WORKFLOW = ROOT / "workflows" / "flux" / "tiny_train_lokr.json"
ARTIFACTS = ROOT / "tests" / "artifacts"
RUN = "web_panel"


def _missing() -> str | None:
    if not CHROMIUM.is_file():
        return f"{CHROMIUM} is missing (apt-get install -y chromium, or `make browser-deps`)"
    if not (ROOT / "node_modules" / "playwright-core").is_dir() or shutil.which("node") is None:
        return "node or node_modules/playwright-core is missing (`npm ci`, or `make browser-deps`)"
    return None


@pytest.fixture(scope="module")
def browser_ready() -> None:
    missing = _missing()
    if missing and os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI must run the browser test, but {missing}")
    if missing:
        pytest.skip(f"browser test skipped: {missing}")


def test_panel_charts_every_step_and_its_buttons_act_on_the_run(comfy, browser_ready) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    screenshot = ARTIFACTS / "web_panel.png"
    screenshot.unlink(missing_ok=True)
    env = {
        **os.environ,
        "COMFY_URL": comfy.url,
        "WORKFLOW": str(WORKFLOW),
        "WORKFLOW_API": str(WORKFLOW.with_name(WORKFLOW.stem + ".api.json")),
        "RUN_NAME": RUN,
        "SCREENSHOT": str(screenshot),
        "CHROMIUM": str(CHROMIUM),
        "STEPS": "600",
    }
    proc = subprocess.run(
        ["node", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=480
    )
    print(f"web panel screenshot: {screenshot}")
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0 and lines, (
        f"browser script failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}\n"
        f"{comfy.log_text()[-3000:]}"
    )
    seen = json.loads(lines[-1])

    run_dir = comfy.base_dir / "output" / "tunegraph" / RUN
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    loss_steps = [r["step"] for r in records if r.get("loss") is not None]
    # the chart holds exactly the steps metrics.jsonl has, and Stop ended the run early
    assert seen["points"] == len(loss_steps) == loss_steps[-1]
    assert 5 <= loss_steps[-1] < 600
    assert seen["afterReload"] >= seen["beforeReload"] >= 5  # the reload kept the history
    # "Save checkpoint now" wrote a complete checkpoint before Stop (which saves the last step)
    first = int(seen["checkpoint"].split("-")[1])
    assert (run_dir / seen["checkpoint"] / "adapter.safetensors").is_file()
    assert first < loss_steps[-1]
    assert (run_dir / f"checkpoint-{loss_steps[-1]}").is_dir()
    assert (run_dir / "pytorch_lora_weights.safetensors").is_file()
    assert seen["thumbs"] >= 1 and list((run_dir / "validation").glob("step-*/*.png"))
    assert "finished" in seen["status"] and seen["active"] is False
    assert screenshot.stat().st_size > 10_000 and screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [e for e in seen["errors"] if "tunegraph" in e.lower()], seen["errors"]
