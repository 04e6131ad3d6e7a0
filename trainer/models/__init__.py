"""Model families (Flux, HiDream): loading, prompt/image encoding, the training forward."""

from .base import ModelBundle
from .flux import FluxModel
from .hidream import HiDreamModel
from .loading import ModelSource
from .registry import FAMILIES, get_family, load_model

__all__ = ["FAMILIES", "FluxModel", "HiDreamModel", "ModelBundle", "ModelSource", "get_family", "load_model"]
