"""A real ComfyUI server for integration tests: one per test session, the pack symlinked in.

`ComfyServer` starts `main.py --cpu` on a free 127.0.0.1 port with a throwaway `--base-directory`,
listens on its websocket in a background thread (aiohttp, which ComfyUI itself requires) and offers
the HTTP API the tests need: queue_prompt, wait, history, interrupt, object_info. Use it through the
`comfy` fixture in conftest.py, or directly (`with ComfyServer(base) as server: ...`).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
COMFY_DIR = Path(os.environ.get("COMFYUI_DIR") or ROOT / ".comfyui" / "ComfyUI")
DONE_TYPES = ("execution_success", "execution_error", "execution_interrupted")


def comfy_available() -> bool:
    return (COMFY_DIR / "main.py").is_file()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PromptRejected(RuntimeError):
    """/prompt answered 400: the graph failed validation. `body` is ComfyUI's JSON answer."""

    def __init__(self, body: dict[str, Any]):
        super().__init__(json.dumps(body)[:2000])
        self.body = body


class ComfyServer:
    def __init__(self, base_dir: Path, comfy_dir: Path = COMFY_DIR, env: dict[str, str] | None = None):
        self.base_dir = Path(base_dir)
        self.comfy_dir = Path(comfy_dir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.client_id = uuid.uuid4().hex
        self.env = {**os.environ, **(env or {})}
        self.messages: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._proc: subprocess.Popen | None = None
        self._ws_thread: threading.Thread | None = None
        self._ws_stop = threading.Event()
        self.log_path = self.base_dir / "comfyui.log"

    # -- life cycle --------------------------------------------------------------------------------

    def start(self, timeout: float = 180) -> ComfyServer:
        pack = self.base_dir / "custom_nodes" / "tunegraph"
        pack.parent.mkdir(parents=True, exist_ok=True)
        if not pack.exists():
            pack.symlink_to(ROOT, target_is_directory=True)
        cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(self.base_dir), "--disable-auto-launch"]  # fmt: skip
        self._log = open(self.log_path, "w")  # noqa: SIM115 (closed in stop)
        self._proc = subprocess.Popen(
            cmd, cwd=self.comfy_dir, stdout=self._log, stderr=subprocess.STDOUT, env=self.env
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self._proc.returncode}:\n{self.log_text()[-4000:]}")
            try:
                self.get("/system_stats")
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.3)
        else:
            self.stop()
            raise RuntimeError(f"ComfyUI did not answer within {timeout} s:\n{self.log_text()[-4000:]}")
        self._ws_thread = threading.Thread(target=lambda: asyncio.run(self._listen()), daemon=True)
        self._ws_thread.start()
        self._wait_for(lambda: any(m["type"] == "status" for m in self.messages), 30, "websocket status")
        return self

    def stop(self) -> None:
        self._ws_stop.set()
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(20)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        if getattr(self, "_log", None):
            self._log.close()

    def __enter__(self) -> ComfyServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # -- websocket ---------------------------------------------------------------------------------

    async def _listen(self) -> None:
        import aiohttp

        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(
                f"{self.url.replace('http', 'ws')}/ws?clientId={self.client_id}"
            ) as ws:
                while not self._ws_stop.is_set():
                    try:
                        msg = await ws.receive(timeout=0.5)
                    except asyncio.TimeoutError:
                        continue
                    if msg.type == aiohttp.WSMsgType.TEXT:
                        with self._cond:
                            self.messages.append(json.loads(msg.data))
                            self._cond.notify_all()
                    elif msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                        return

    def _wait_for(self, predicate, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"timed out after {timeout} s waiting for {what}\n{self.log_text()[-3000:]}"
                    )
                self._cond.wait(min(left, 0.5))

    def messages_for(self, prompt_id: str) -> list[dict[str, Any]]:
        with self._cond:
            return [m for m in self.messages if m.get("data", {}).get("prompt_id") == prompt_id]

    def wait_for_message(self, prompt_id: str, msg_type: str, timeout: float = 120) -> dict[str, Any]:
        self._wait_for(
            lambda: any(m["type"] == msg_type for m in self.messages_for(prompt_id)), timeout, msg_type
        )
        return next(m for m in self.messages_for(prompt_id) if m["type"] == msg_type)

    def wait(self, prompt_id: str, timeout: float = 300) -> list[dict[str, Any]]:
        """Every websocket message of `prompt_id` once it succeeded, failed or was interrupted."""
        done = lambda: any(m["type"] in DONE_TYPES for m in self.messages_for(prompt_id))  # noqa: E731
        self._wait_for(done, timeout, f"prompt {prompt_id} to finish")
        return self.messages_for(prompt_id)

    # -- HTTP --------------------------------------------------------------------------------------

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read() or b"null")

    def post(self, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
        data = json.dumps(body or {}).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                raw = r.read()
                return r.status, json.loads(raw) if raw.strip() else None
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                return e.code, json.loads(raw)
            except json.JSONDecodeError:
                return e.code, raw.decode(errors="replace")

    def queue_prompt(self, workflow: dict[str, Any]) -> str:
        """POST an API-format workflow to /prompt; returns its prompt_id (PromptRejected on 400)."""
        status, body = self.post("/prompt", {"prompt": workflow, "client_id": self.client_id})
        if status != 200:
            raise PromptRejected(body if isinstance(body, dict) else {"error": body, "status": status})
        return body["prompt_id"]

    def run(self, workflow: dict[str, Any], timeout: float = 300) -> list[dict[str, Any]]:
        return self.wait(self.queue_prompt(workflow), timeout)

    def history(self, prompt_id: str, timeout: float = 30) -> dict[str, Any]:
        """The prompt's /history entry; ComfyUI writes it just after execution_success, so poll."""
        deadline = time.monotonic() + timeout
        while True:
            entry = self.get(f"/history/{prompt_id}").get(prompt_id, {})
            if entry.get("status", {}).get("completed") is not None or time.monotonic() > deadline:
                return entry
            time.sleep(0.1)

    def free(self) -> None:
        """Drop ComfyUI's cached node outputs (and models) before the next prompt, as a restart would."""
        self.post("/free", {"unload_models": True, "free_memory": True})
        # /free only sets flags; the prompt worker applies them when it next wakes. A prompt queued
        # before that would still hit the old cache, so give the (notified) worker a moment.
        time.sleep(1.5)

    def interrupt(self) -> None:
        self.post("/interrupt")

    def object_info(self, node: str | None = None) -> dict[str, Any]:
        return self.get("/object_info" + (f"/{node}" if node else ""))


TINY_TRAIN = ROOT / "workflows" / "flux" / "tiny_train_lokr.api.json"
TRAIN_NODE = "5"  # its TrainLoKr node


def tiny_train_workflow(name: str, steps: int, **train_inputs: Any) -> dict[str, Any]:
    """The bundled tiny Flux training workflow (API format) training `steps` into run folder `name`,
    with no intermediate checkpoints or eval; `train_inputs` change more TrainLoKr inputs."""
    wf = json.loads(TINY_TRAIN.read_text())
    inputs = wf[TRAIN_NODE]["inputs"]
    inputs.update(output_name=name, steps=steps, checkpoint_interval=0, eval_interval=0)
    inputs.update(train_inputs)
    return wf


def outcome(messages: list[dict[str, Any]]) -> dict[str, Any]:
    """The final message (execution_success / _error / _interrupted) of one prompt's messages."""
    done = [m for m in messages if m["type"] in DONE_TYPES]
    if not done:
        raise AssertionError(f"prompt did not finish: {[m['type'] for m in messages]}")
    return done[-1]
