"""A family's transformer built on the meta device: its module names and shapes with no weights, so
adapter targets and image sizes are checked in seconds before anything is loaded (issue 15)."""

from __future__ import annotations

import torch

from .base import ModelBundle
from .loading import ModelSource, component_folder


def meta_like(transformer: torch.nn.Module) -> torch.nn.Module | None:
    """A loaded (diffusers) transformer's twin on the meta device, from its config: a preloaded
    model is checked without touching its weights or wrapping its modules."""
    config = getattr(transformer, "config", None)
    if config is None or not hasattr(type(transformer), "from_config"):
        return None
    with torch.device("meta"):
        return type(transformer).from_config(dict(config))


def meta_transformer(family: type[ModelBundle], source: ModelSource) -> torch.nn.Module | None:
    """The transformer as configured (its folder's config.json, else the tiny flavour's), on the
    meta device; None when neither is known. Path errors are the loader's own ConfigErrors."""
    cls = family.transformer_class
    key = "pretrained_transformer_model_name_or_path"
    root = source.folder(key)
    subfolder = source.pretrained_transformer_subfolder
    if root is None:
        key = "pretrained_model_name_or_path"
        root = source.folder(key, family.hub_ids.get(source.flavour or family.default_flavour))
        subfolder = "transformer"
    with torch.device("meta"):
        if root is not None:
            folder = component_folder(root, subfolder, key, source.origin)
            return cls.from_config(cls.load_config(folder))
        if (source.flavour or "") == "tiny" and family.tiny_transformer is not None:
            return family.tiny_transformer()
    return None
