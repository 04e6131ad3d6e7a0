"""Value coercion for SimpleTuner-style configs, where numbers and booleans often arrive as strings.

Each function takes the raw value and `where` (e.g. "config.json: key 'resolution'") for its error.
"""

from __future__ import annotations

import math
from typing import Any

from .errors import ConfigError

_TRUE = {"true", "yes", "1", "on"}
_FALSE = {"false", "no", "0", "off", "", "none"}


def _fail(where: str, expects: str, value: Any) -> ConfigError:
    return ConfigError(f"{where} expects {expects}, got {value!r}")


def to_bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise _fail(where, "true or false", value)


def to_float(value: Any, where: str) -> float:
    if isinstance(value, bool):
        raise _fail(where, "a number", value)
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            pass
    raise _fail(where, "a number", value)


def to_int(value: Any, where: str) -> int:
    number = to_float(value, where.replace("expects", "")) if not isinstance(value, int) else value
    if isinstance(number, float) and not math.isfinite(number):  # 1e400 parses as inf
        raise _fail(where, "a finite whole number", value)
    if isinstance(number, bool) or float(number) != int(number):
        raise _fail(where, "a whole number", value)
    return int(number)


def to_str(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise _fail(where, "a string", value)


def to_optional(fn, value: Any, where: str) -> Any:
    """None / "" / "none" / "null" stay None; anything else goes through `fn`."""
    if value is None or (isinstance(value, str) and value.strip().lower() in {"", "none", "null"}):
        return None
    return fn(value, where)
