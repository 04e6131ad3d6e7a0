"""Plain names: values that become one path component (dataset ids, run names).

A plain name cannot climb out of or into another folder: no separators, not `.` or `..`, no NUL or
control characters, at most 255 bytes (the file-system limit), valid text.
"""

from __future__ import annotations

from .errors import ConfigError

MAX_BYTES = 255


def name_problem(value: str) -> str | None:
    """Why `value` is not a plain name, or None."""
    if not value or not value.strip():
        return "it is empty"
    if value.strip() in (".", ".."):
        return f"'{value}' names a folder itself, not a name inside it"
    if "/" in value or "\\" in value:
        return "it contains a path separator (/ or \\)"
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        return "it contains a control character"
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        return "it is not valid text (UTF-8)"
    if size > MAX_BYTES:
        return f"it is {size} bytes long; at most {MAX_BYTES}"
    return None


def plain_name(value: str, what: str) -> str:
    """`value` if it is a plain name, else a ConfigError naming `what` and why."""
    problem = name_problem(str(value))
    if problem is not None:
        raise ConfigError(
            f"{what}: {str(value)[:80]!r} is not a plain name ({problem}); use letters, digits, - and _"
        )
    return str(value)
