"""One config model for the CLI and the nodes, read from SimpleTuner's config.json as users have it.

String numbers and booleans are coerced, `--`-prefixed keys accepted, trailing commas allowed. An
unknown key is an error with a did-you-mean; a known SimpleTuner key we do not implement yet is named
in one warning.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Any

from . import coerce
from .config_keys import ALIASES, KEYS, NOT_YET, UNSUPPORTED, Key
from .config_notes import Unacted, is_noop
from .data.path_variables import fill_value
from .errors import ConfigError
from .jsonfile import load_json

log = logging.getLogger("tunegraph")

_COERCE = {
    "str": coerce.to_str,
    "path": coerce.to_str,
    "int": coerce.to_int,
    "float": coerce.to_float,
    "bool": coerce.to_bool,
}


def did_you_mean(name: str, options: Any, cutoff: float = 0.6) -> str:
    """' (did you mean 'x'?)' or '' — shared by every unknown-name error."""
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=cutoff)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _coerce(name: str, key: Key, value: Any, source: str) -> Any:
    where = f"{source}: key '{name}'"
    if key.kind == "any":
        return value
    result = coerce.to_optional(_COERCE[key.kind], value, where)
    if key.kind == "float" and result is not None and name == "resolution" and result == int(result):
        result = int(result)
    if key.choices and result is not None and result not in key.choices:
        hint = did_you_mean(str(result), key.choices)
        raise ConfigError(f"{where}: {result!r} is not one of {', '.join(key.choices)}{hint}")
    if key.kind in ("int", "float") and result is not None:
        check_range(key, result, where)
    return result


def check_range(key: Key, value: float, where: str) -> None:
    """issue 18: NaN / Inf and values outside the key's declared range are errors naming the key."""
    if not math.isfinite(value):
        raise ConfigError(f"{where}: {value} is not a finite number")
    low, high = key.minimum, key.maximum
    if low is not None and (value <= low if key.above else value < low):
        bound = f"> {low:g}" if key.above else f">= {low:g}"
        raise ConfigError(f"{where} must be {bound}, got {value:g}")
    if high is not None and value > high:
        raise ConfigError(f"{where} must be <= {high:g}, got {value:g}")


_is_noop = is_noop


class TrainConfig:
    """Typed SimpleTuner config values, read as attributes (`cfg.train_batch_size`)."""

    def __init__(self, values: dict[str, Any], config_dir: Path | None, source: str, warnings: list[str]):
        object.__setattr__(self, "_values", values)
        object.__setattr__(self, "config_dir", config_dir)
        object.__setattr__(self, "source", source)
        object.__setattr__(self, "warnings", warnings)

    @classmethod
    def from_dict(
        cls, data: dict[str, Any], base_dir: Path | None = None, source: str = "<dict>"
    ) -> TrainConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object of config keys, got {type(data).__name__}")
        values = {name: key.default for name, key in KEYS.items() if name not in ALIASES}
        ignored: list[str] = []
        unacted = Unacted(source)
        for raw_name, value in data.items():
            if raw_name.lstrip("-").strip() in NOT_YET and not _is_noop(value, "no_change"):
                ignored.append(f"{raw_name.lstrip('-')}={value!r}")
            name = raw_name.lstrip("-").strip()
            value = fill_value(value, {})  # issue 15: {env:NAME}, as SimpleTuner fills config values
            if name not in KEYS and unacted.take(name, value):
                continue
            if name not in KEYS:
                hint = did_you_mean(name, list(KEYS) + list(UNSUPPORTED))
                raise ConfigError(f"{source}: unknown key '{raw_name}'{hint}")
            values[ALIASES.get(name, name)] = _coerce(name, KEYS[name], value, source)
        warnings = []
        if ignored:
            unacted.default[:0] = ignored
        note = unacted.warning()
        if note:
            warnings.append(note)
            log.warning(note)
        cfg = cls(values, Path(base_dir) if base_dir else None, source, warnings)
        cfg._check()
        return cfg

    def _check(self) -> None:
        if self.learning_rate is not None and self.learning_rate <= 0:
            raise ConfigError(f"{self.source}: key 'learning_rate' must be > 0, got {self.learning_rate}")
        for name in ("train_batch_size", "gradient_accumulation_steps", "vae_batch_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{self.source}: key '{name}' must be at least 1")
        if self.mixed_precision == "fp16":  # why not a GradScaler: README "Precision"
            raise ConfigError(
                f"{self.source}: key 'mixed_precision': 'fp16' is not supported (Flux and HiDream overflow "
                "float16's range in training); use 'bf16' (the default) or 'no' (fp32)"
            )
        if self.lora_type == "lycoris" and not self.lycoris_config:
            raise ConfigError(f"{self.source}: lora_type 'lycoris' needs key 'lycoris_config' (a JSON file)")

    def __getattr__(self, name: str) -> Any:
        values = object.__getattribute__(self, "_values")
        if name in values:
            return values[name]
        raise AttributeError(f"TrainConfig has no key '{name}'{did_you_mean(name, list(values))}")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("TrainConfig is read-only; use cfg.replace(key=value)")

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with some keys changed (coerced and checked like file values)."""
        data = {**self._values, **changes}
        return TrainConfig.from_dict(data, self.config_dir, self.source)

    def to_dict(self) -> dict[str, Any]:
        return dict(self._values)

    def config_hash(self) -> str:
        """Hash of every value that affects training (stable across key order)."""
        blob = json.dumps(self._values, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def input_path(self, key: str) -> Path:
        """Resolve a path key: as given if absolute, else against the working directory, then the
        config's folder. The error names the key and every place tried."""
        value = getattr(self, key)
        if not value:
            raise ConfigError(f"{self.source}: key '{key}' is not set")
        return resolve_path(value, self.config_dir, f"{self.source}: key '{key}'")


def resolve_path(value: str | Path, config_dir: Path | None, where: str) -> Path:
    """Find an input file or folder: absolute, else cwd, else `config_dir`; error names both."""
    p = Path(value).expanduser()
    candidates = [p] if p.is_absolute() else [Path.cwd() / p] + ([config_dir / p] if config_dir else [])
    for c in candidates:
        if c.exists():
            return c
    tried = " and ".join(str(c) for c in candidates)
    raise ConfigError(f"{where}: '{value}' not found (tried {tried})")


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read a SimpleTuner config.json (lenient JSON); `overrides` win over file values."""
    p = Path(path)
    data = load_json(p)
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a JSON object of config keys")
    return TrainConfig.from_dict({**data, **(overrides or {})}, p.resolve().parent, str(p))
