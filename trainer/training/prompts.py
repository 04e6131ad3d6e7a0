"""Validation prompt set, resolutions and image paths.

Prompts come from `validation_prompt` (nickname "validation") and the `user_prompt_library` JSON
(nickname -> prompt, or nickname -> {"prompt": ...}). `<token>` in nicknames and prompts becomes the
instance prompt when one is set, as SimpleTuner's guides describe.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..jsonfile import load_json

log = logging.getLogger("tunegraph")

TOKEN = "<token>"
# Flux packs 2x2 patches of a latent 8x smaller than the image: sizes must be multiples of 16.
RESOLUTION_MULTIPLE = 16


def load_prompt_library(path: str | Path) -> dict[str, str]:
    """nickname -> prompt from a user_prompt_library JSON file (lenient JSON)."""
    data = load_json(Path(path))
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: user_prompt_library must be a JSON object of nickname -> prompt")
    library = {}
    for nickname, entry in data.items():
        prompt = entry.get("prompt") if isinstance(entry, dict) else entry
        if not isinstance(prompt, str) or not prompt.strip():
            raise ConfigError(
                f"{path}: prompt '{nickname}' must be a non-empty string (or {{\"prompt\": ...}})"
            )
        library[str(nickname)] = prompt
    return library


def _fill(text: str, instance_prompt: str | None) -> str:
    return text.replace(TOKEN, instance_prompt) if instance_prompt else text


def validation_prompts(cfg: Any, instance_prompt: str | None = None) -> list[tuple[str, str]]:
    """[(nickname, prompt)]: validation_prompt first, then the library in file order. The instance
    prompt is cfg.instance_prompt, else `instance_prompt` (the first dataset's). Nicknames that would
    give the same file name get a numeric suffix."""
    token = getattr(cfg, "instance_prompt", None) or instance_prompt
    pairs: list[tuple[str, str]] = []
    if getattr(cfg, "validation_prompt", None):
        pairs.append(("validation", cfg.validation_prompt))
    if getattr(cfg, "user_prompt_library", None):
        pairs.extend(load_prompt_library(cfg.input_path("user_prompt_library")).items())
    if not token and any(TOKEN in nick or TOKEN in prompt for nick, prompt in pairs):
        log.warning("validation prompts use %s but no instance_prompt is set; it stays as written", TOKEN)
    out, seen = [], set()
    for nickname, prompt in pairs:
        nick = _fill(nickname, token)
        unique, n = nick, 2
        while safe_name(unique) in seen:
            unique, n = f"{nick}-{n}", n + 1
        seen.add(safe_name(unique))
        out.append((unique, _fill(prompt, token)))
    return out


def _parse_one(text: str, where: str) -> tuple[int, int]:
    pieces = text.lower().split("x")
    if len(pieces) not in (1, 2) or not all(p.strip().isdigit() for p in pieces):
        raise ConfigError(
            f"{where}: {text!r} is not WIDTHxHEIGHT or a single number (e.g. 1024x1024 or 1024)"
        )
    width = int(pieces[0])
    height = int(pieces[-1])
    return width, height


def _round_down(value: int, multiple: int, where: str) -> int:
    if value < multiple:
        raise ConfigError(f"{where}: {value} px is too small; use at least {multiple}")
    return value - value % multiple


def parse_resolutions(
    value: str | int | list[Any] | tuple[Any, ...],
    multiple: int = RESOLUTION_MULTIPLE,
    where: str = "validation_resolution",
) -> list[tuple[int, int]]:
    """Parse "1024x1024,1280x768" | "1024" | 1024 | a list of those into [(W, H)]; one number means a
    square. Sizes round down to `multiple` (as the Flux pipeline does) with a warning; duplicates drop."""
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    out: list[tuple[int, int]] = []
    for item in items:
        text = str(item).strip()
        if not text:
            continue
        w, h = _parse_one(text, where)
        size = (_round_down(w, multiple, where), _round_down(h, multiple, where))
        if size != (w, h):
            log.warning("%s: %dx%d is not a multiple of %d; using %dx%d", where, w, h, multiple, *size)
        if size not in out:
            out.append(size)
    if not out:
        raise ConfigError(f"{where}: no resolution given (e.g. 1024 or 1024x1024,1280x768)")
    return out


def safe_name(nickname: str, max_len: int = 100) -> str:
    """A nickname as a portable file name: letters, digits, '.', '_' and '-' only."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", nickname).strip("._-")
    return name[:max_len] or "prompt"


def validation_image_path(output_dir: str | Path, step: int, nickname: str, width: int, height: int) -> Path:
    """output_dir/validation/step-NNNNNN/<nickname>-<W>x<H>.png."""
    return (
        Path(output_dir)
        / "validation"
        / f"step-{int(step):06d}"
        / f"{safe_name(nickname)}-{width}x{height}.png"
    )
