"""`make demo` on a headless ComfyUI: start it with the pack, queue the tiny Flux training workflow
through plain HTTP, wait, and say where the adapter, the images and the loss plot are.

    python -m tunegraph.nodes.demo_server --out output/demo-comfyui [--comfyui PATH] [--steps N]

Needs no ComfyUI import here (it runs ComfyUI as a child process), only the standard library.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / "workflows" / "flux" / "tiny_train_lokr.api.json"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _call(url: str, body: dict | None = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read() or b"null")


def start_comfyui(comfy_dir: Path, base: Path, port: int, log_path: Path) -> subprocess.Popen:
    """ComfyUI on 127.0.0.1:port with this pack linked into base/custom_nodes/tunegraph."""
    pack = base / "custom_nodes" / "tunegraph"
    pack.parent.mkdir(parents=True, exist_ok=True)
    if not pack.exists():
        pack.symlink_to(ROOT, target_is_directory=True)
    cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
           "--base-directory", str(base), "--disable-auto-launch"]  # fmt: skip
    log = open(log_path, "w")  # noqa: SIM115 (the child keeps it)
    proc = subprocess.Popen(cmd, cwd=comfy_dir, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ComfyUI exited ({proc.returncode}); see {log_path}")
        try:
            _call(f"http://127.0.0.1:{port}/system_stats")
            return proc
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    proc.terminate()
    raise RuntimeError(f"ComfyUI did not start within 180 s; see {log_path}")


def queue_and_wait(url: str, workflow: dict, timeout: float = 1800) -> dict:
    """POST /prompt, then poll /history until the prompt finished; returns its history entry."""
    prompt_id = _call(f"{url}/prompt", {"prompt": workflow, "client_id": uuid.uuid4().hex})["prompt_id"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        entry = _call(f"{url}/history/{prompt_id}").get(prompt_id)
        if entry and entry.get("status", {}).get("completed") is not None:
            return entry
        time.sleep(1)
    raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout} s")


def run_demo(
    out: Path, comfy_dir: Path, steps: int | None = None, learning_rate: float | None = None
) -> dict[str, Any]:
    out = out.resolve()
    base = out / "comfyui-base"
    workflow = json.loads(WORKFLOW.read_text())
    if steps:
        workflow["5"]["inputs"]["steps"] = steps
    if learning_rate:
        workflow["5"]["inputs"]["learning_rate"] = learning_rate
    port = _free_port()
    proc = start_comfyui(comfy_dir, base, port, out / "comfyui.log")
    try:
        started = time.monotonic()
        entry = queue_and_wait(f"http://127.0.0.1:{port}", workflow)
        seconds = time.monotonic() - started
    finally:
        proc.terminate()
        proc.wait(30)
    status = entry["status"]
    if status.get("status_str") != "success":
        errors = [m for m in status.get("messages", []) if m[0] == "execution_error"]
        raise RuntimeError(f"the workflow failed: {json.dumps(errors)[:2000]}; see {out / 'comfyui.log'}")
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    for node in entry["outputs"].values():
        for im in node.get("images", []):
            src = base / im["type"] / im.get("subfolder", "") / im["filename"]
            if src.is_file():
                shutil.copy2(src, images / im["filename"])
    run = base / "output" / "tunegraph" / workflow["5"]["inputs"]["output_name"]
    return {
        "seconds": round(seconds, 1),
        "adapter": str(
            base / "models" / "loras" / "tunegraph" / f"{workflow['7']['inputs']['name']}.safetensors"
        ),
        "run": str(run),
        "loss_plot": str(run / "loss.png"),
        "images": sorted(str(p) for p in images.iterdir()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("output/demo-comfyui"))
    parser.add_argument(
        "--comfyui", type=Path, default=Path(os.environ.get("COMFYUI_DIR", ROOT / ".comfyui/ComfyUI"))
    )
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--learning-rate", type=float, default=None)
    args = parser.parse_args(argv)
    summary = run_demo(args.out, args.comfyui, args.steps, args.learning_rate)
    print(f"trained through ComfyUI's API in {summary['seconds']} s")
    print(
        f"adapter:   {summary['adapter']}\nloss plot: {summary['loss_plot']}\nimages:    {', '.join(summary['images'])}"
    )
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
