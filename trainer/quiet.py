"""Third-party log lines that tell a user nothing they can act on are dropped where they are logged;
everything else (our own `tunegraph` messages, real library warnings and errors) comes through.

A filter on the logger a record is created on applies whatever handlers the library (diffusers,
LyCORIS: their own stream handlers) or the host (ComfyUI's log) installed.
"""

from __future__ import annotations

import logging

# logger name -> message fragments to drop
NOISE: dict[str, tuple[str, ...]] = {
    # every .to(dtype) of a diffusers model, even when the list of such modules is empty
    "diffusers.models.modeling_utils": ("that should be kept in float32: []",),
    # a quantised base is trained in LyCORIS bypass mode on purpose (adapters/lycoris.py)
    "LyCORIS": ("will enable force-bypass mode",),
}


class DropNoise(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(f in message for f in self.fragments)


def install() -> None:
    """Attach the filters (idempotent)."""
    for name, fragments in NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropNoise) for f in logger.filters):
            logger.addFilter(DropNoise(fragments))
