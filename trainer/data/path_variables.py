"""SimpleTuner's variables in multidatabackend.json values: `{model_family}`, `{output_dir}`,
`{id}` (the entry's own id) and `{env:NAME}` (an environment variable, empty when unset), filled
into every string of every entry as its data_backend/factory.py `fill_variables_in_config_paths`
does. Unknown `{...}` stay as written, as there.
"""

from __future__ import annotations

import os
import re
from typing import Any

_PLACEHOLDER = re.compile(r"\{([^{}]+)\}")


def fill_string(value: str, variables: dict[str, Any]) -> str:
    def replace(match: re.Match[str]) -> str:
        token = match.group(1)
        if token.startswith("env:"):
            return os.environ.get(token[4:], "")
        if token in variables:
            return "" if variables[token] is None else str(variables[token])
        return match.group(0)

    return _PLACEHOLDER.sub(replace, value)


def fill_value(value: Any, variables: dict[str, Any]) -> Any:
    if isinstance(value, str):
        return fill_string(value, variables)
    if isinstance(value, list):
        return [fill_value(v, variables) for v in value]
    if isinstance(value, dict):
        return {k: fill_value(v, variables) for k, v in value.items()}
    return value


def fill_entry(entry: dict[str, Any], model_family: str, output_dir: str | None) -> dict[str, Any]:
    """One dataset entry with its variables filled (SimpleTuner's default output_dir when unset)."""
    variables = {
        "model_family": model_family,
        "output_dir": output_dir or os.path.join(os.getcwd(), ".simpletuner_output"),
        "id": str(entry.get("id", "") or ""),
    }
    return fill_value(entry, variables)
