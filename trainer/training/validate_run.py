"""`tunegraph validate`: render a config's validation prompts with an adapter file, no training."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..adapters import load_adapter_file, read_adapter_metadata
from ..errors import ConfigError
from ..models.prepare import prepare_model
from .run import FINAL_NAME
from .validation import render_validation

log = logging.getLogger("tunegraph")


def validate_adapter(cfg, adapter: Path | None = None, *, model=None) -> dict[str, Any]:
    """Images go to output_dir/validation/step-N/ (N from the adapter's metadata; 0 without one)."""
    path = Path(adapter) if adapter else Path(cfg.output_dir) / FINAL_NAME
    if adapter is None and not path.exists():
        log.info("no adapter at %s: rendering the base model", path)
        path = None
    elif not path.exists():
        raise ConfigError(f"--adapter {path}: file not found")
    if not cfg.validation_prompt and not cfg.user_prompt_library:
        raise ConfigError(f"{cfg.source}: set 'validation_prompt' or 'user_prompt_library' to validate")
    model = model or prepare_model(cfg)  # the base as trained: same dtype and quantisation
    step = 0
    if path is not None:
        meta = read_adapter_metadata(path)
        if meta.get("family") and meta["family"] != model.family:
            raise ConfigError(f"{path} was trained on {meta['family']}, but the config loads {model.family}")
        load_adapter_file(path, model.transformer)
        step = int(meta.get("step") or 0)
    images = render_validation(cfg, model, Path(cfg.output_dir), step)
    return {
        "adapter": str(path) if path else None,
        "step": step,
        "validation_images": [str(p) for p in images],
    }
