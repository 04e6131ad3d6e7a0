"""Lenient JSON as SimpleTuner users write it: trailing commas and bare key fragments.

Anything else that is not JSON is reported as `file:line:col: message`.
"""

from __future__ import annotations

import codecs
import json
from pathlib import Path
from typing import Any

from .errors import ConfigError


def _strip_trailing_commas(text: str) -> str:
    """Blank out commas that only precede `}` or `]`, outside strings; keeps line/col positions."""
    out = list(text)
    in_str = escape = False
    last_comma = -1
    for i, ch in enumerate(text):
        if in_str:
            if escape:
                escape = False
            elif ch == "\\":
                escape = True
            elif ch == '"':
                in_str = False
            continue
        if ch == '"':
            in_str, last_comma = True, -1
        elif ch == ",":
            last_comma = i
        elif ch in "}]":
            if last_comma >= 0:
                out[last_comma] = " "
            last_comma = -1
        elif not ch.isspace():
            last_comma = -1
    return "".join(out)


def parse_json(text: str, source: str = "<string>") -> Any:
    """Parse lenient JSON text; `source` names the origin in error messages."""
    body = _strip_trailing_commas(text)
    fragment = body.lstrip().startswith('"')
    if fragment:  # a pasted `"key": value,` fragment: wrap it as an object
        body = "{" + body.rstrip().rstrip(",") + "}"
    try:
        return json.loads(body)
    except json.JSONDecodeError as e:
        col = e.colno - 1 if fragment and e.lineno == 1 else e.colno
        raise ConfigError(f"{source}:{e.lineno}:{max(col, 1)}: invalid JSON: {e.msg}") from None


_BOMS = (
    (codecs.BOM_UTF32_LE, "UTF-32"),
    (codecs.BOM_UTF32_BE, "UTF-32"),
    (codecs.BOM_UTF16_LE, "UTF-16"),
    (codecs.BOM_UTF16_BE, "UTF-16"),
)


def decode_text(data: bytes, source: str) -> str:
    """UTF-8 (a UTF-8 BOM is dropped); UTF-16/32 or other bytes are a ConfigError naming the encoding."""
    for bom, name in _BOMS:
        if data.startswith(bom):
            raise ConfigError(f"{source}: the file is {name} text; save it as UTF-8 and try again")
    if len(data) >= 2 and b"\x00" in data[:4]:
        raise ConfigError(f"{source}: the file looks like UTF-16 text (NUL bytes); save it as UTF-8")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ConfigError(
            f"{source}:{line}: not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}); "
            "save the file as UTF-8"
        ) from None


def load_json(path: str | Path) -> Any:
    """Read a JSON file leniently; errors name the file (and line:col for syntax, or the encoding)."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{p}: file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{p}: is a folder, not a JSON file") from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot read: {e.strerror}") from None
    return parse_json(decode_text(data, str(p)), str(p))
