"""Start ComfyUI inside a child process: the one copy of the start-up every ComfyUI child module uses.

ComfyUI's modules set global state when imported (parsed command-line arguments, the device, folder
paths, logging), so the tests import it only in child processes (`python -m child.<name>` or
`python -m comfy_fixtures`, run from tests/). Call `start_comfy` before any `import comfy...`; the
child modules therefore import ComfyUI inside their functions.
"""

from __future__ import annotations

import io
import logging
import sys

LOGS = io.StringIO()  # ComfyUI's warnings ("lora key not loaded: ...")


def start_comfy(comfy_dir: str, *args: str) -> None:
    """Put ComfyUI on sys.path, capture WARNING logs in LOGS and parse `--cpu *args` as ComfyUI's
    command line (its arguments are parsed once, when comfy.cli_args is first imported)."""
    sys.path.insert(0, comfy_dir)
    logging.basicConfig(stream=LOGS, level=logging.WARNING, force=True)
    import comfy.options

    comfy.options.enable_args_parsing()
    argv, sys.argv = sys.argv, [sys.argv[0], "--cpu", *args]
    import comfy.sd  # noqa: F401  (parses the arguments above)

    sys.argv = argv


def lora_keys_not_loaded() -> int:
    """How many "lora key not loaded" warnings ComfyUI has logged so far."""
    return LOGS.getvalue().count("lora key not loaded")
