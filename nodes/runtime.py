"""What a TuneGraph node needs from a running ComfyUI: progress, Cancel, messages, memory, autograd.

Every ComfyUI import is inside a function so the rest of the pack (and its unit tests) import
without a server.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch

log = logging.getLogger("tunegraph")

TRAIN_EVENT = "tunegraph.train"  # websocket event the web panel listens to


def torch_device() -> torch.device:
    import comfy.model_management as mm

    return mm.get_torch_device()


@contextlib.contextmanager
def autograd_on() -> Iterator[None]:
    """ComfyUI runs nodes under torch.inference_mode(); tensors made there can never join autograd,
    so anything training will touch (the model's weights included) is built and used in here."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def free_comfy_models() -> None:
    """Unload the models ComfyUI holds (checkpoints, CLIP, VAE) before training needs the memory."""
    import comfy.model_management as mm

    mm.unload_all_models()
    mm.soft_empty_cache()


def interrupt_types() -> tuple[type[BaseException], ...]:
    import comfy.model_management as mm

    return (mm.InterruptProcessingException, KeyboardInterrupt)


def check_interrupt() -> None:
    """Raise ComfyUI's InterruptProcessingException when the user pressed Cancel (or /interrupt)."""
    import comfy.model_management as mm

    mm.throw_exception_if_processing_interrupted()


class Progress:
    """A ComfyUI ProgressBar (websocket `progress` messages, which is also what makes Cancel reach
    us between steps) plus optional progress text and a custom event for the web panel."""

    def __init__(self, total: int, node_id: str | None = None):
        import comfy.utils

        self.node_id = node_id
        self.bar = comfy.utils.ProgressBar(max(1, int(total)), node_id=node_id)

    def update(self, value: int, total: int | None = None, text: str | None = None) -> None:
        self.bar.update_absolute(value, total)
        if text and self.node_id:
            server = _server()
            if server is not None:
                server.send_progress_text(text, self.node_id, server.client_id)

    def send(self, event: str, data: dict[str, Any]) -> None:
        server = _server()
        if server is not None:
            server.send_sync(event, {"node": self.node_id, **data}, server.client_id)


def _server():
    try:
        from server import PromptServer
    except ImportError:
        return None
    return getattr(PromptServer, "instance", None)
