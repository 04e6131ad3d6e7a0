"""Where model components come from: `ModelSource`, local folder resolution and component loading.

Weights are never downloaded: every path must be a local diffusers folder or a ComfyUI-format
.safetensors file (single_file.py). A hub id or a missing path is a ConfigError naming the key and
saying what to do.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers.utils import logging as transformers_logging

from ..errors import ConfigError
from .weights_file import WeightsFile

_PATH_KEYS = (
    "pretrained_model_name_or_path",
    "pretrained_vae_model_name_or_path",
    "pretrained_transformer_model_name_or_path",
)


@dataclass(frozen=True)
class ModelSource:
    """What to load, named with SimpleTuner's config keys. `base_dir` is where relative paths are
    also tried (the config's folder); `origin` names the config in error messages."""

    flavour: str | None = None
    pretrained_model_name_or_path: str | None = None
    pretrained_vae_model_name_or_path: str | None = None
    pretrained_transformer_model_name_or_path: str | None = None
    pretrained_transformer_subfolder: str | None = "transformer"
    seed: int = 0
    base_model_precision: str | None = None  # issue 13: "fp8-file" keeps an fp8 file's weights fp8
    base_dir: Path | None = None
    origin: str = "model source"
    # issue 13: text_encoder_1_path .. text_encoder_4_path (family order) and comfyui_path
    text_encoder_paths: tuple[str | None, ...] = ()
    comfyui_path: str | None = None

    @classmethod
    def from_config(cls, cfg: Any) -> ModelSource:
        """Build from a TrainConfig (or anything with the same attributes)."""
        values = {key: getattr(cfg, key, None) for key in _PATH_KEYS}
        subfolder = getattr(cfg, "pretrained_transformer_subfolder", "transformer")
        return cls(
            flavour=getattr(cfg, "model_flavour", None),
            pretrained_transformer_subfolder=subfolder,
            seed=int(getattr(cfg, "tiny_model_seed", None) or 0),
            base_model_precision=getattr(cfg, "base_model_precision", None),
            base_dir=getattr(cfg, "config_dir", None),
            origin=getattr(cfg, "source", "config"),
            text_encoder_paths=tuple(getattr(cfg, f"text_encoder_{i}_path", None) for i in range(1, 5)),
            comfyui_path=getattr(cfg, "comfyui_path", None),
            **values,
        )

    def resolve(self, key: str, hub_hint: str | None = None) -> Path | None:
        """The local folder or file for path key `key`, or None when the key is not set."""
        value = getattr(self, key)
        if not value:
            return None
        p = Path(value).expanduser()
        candidates = (
            [p] if p.is_absolute() else [Path.cwd() / p] + ([self.base_dir / p] if self.base_dir else [])
        )
        for c in candidates:
            if c.is_dir() or c.is_file():
                return c
        tried = " and ".join(str(c) for c in candidates)
        looks_like_hub = not p.is_absolute() and value.count("/") == 1 and not value.startswith(".")
        what = f"'{value}' looks like a Hugging Face hub id" if looks_like_hub else f"'{value}' not found"
        raise ConfigError(
            f"{self.origin}: key '{key}': {what} (tried {tried}). TuneGraph never downloads weights: "
            f"download the model yourself{f' (e.g. {hub_hint})' if hub_hint else ''} and set '{key}' to "
            "the local diffusers folder or ComfyUI .safetensors file."
        )

    def folder(self, key: str, hub_hint: str | None = None) -> Path | None:
        """The local folder for path key `key`; None when unset or a single file (see `weights_file`)."""
        p = self.resolve(key, hub_hint)
        return p if p is not None and p.is_dir() else None

    def weights_file(self, key: str) -> WeightsFile | None:
        """The ComfyUI-format file path key `key` names, opened (header only); None for a folder."""
        p = self.resolve(key)
        return WeightsFile.open(p, self.origin, key) if p is not None and p.is_file() else None


def component_folder(root: Path, subfolder: str | None, key: str, origin: str) -> Path:
    """`root/subfolder` when it exists; `subfolder` "none"/None means `root` itself."""
    if subfolder and subfolder.lower() != "none" and (root / subfolder).is_dir():
        return root / subfolder
    if (root / "config.json").is_file() or (root / "tokenizer_config.json").is_file():
        return root
    if (root / "scheduler_config.json").is_file():
        return root
    expected = root / subfolder if subfolder and subfolder.lower() != "none" else root
    raise ConfigError(
        f"{origin}: key '{key}': {expected} is not a diffusers component folder (no config.json). "
        "Point the key at a complete local diffusers model folder."
    )


def load_component(cls: Any, folder: Path, dtype: torch.dtype | None, key: str, origin: str) -> Any:
    """`cls.from_pretrained(folder)` offline; a broken folder becomes a ConfigError naming `key`."""
    kwargs: dict[str, Any] = {"local_files_only": True}
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    try:
        with quiet_progress():
            return cls.from_pretrained(str(folder), **kwargs)
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
        raise ConfigError(
            f"{origin}: key '{key}': could not load {cls.__name__} from {folder}: {exc}. "
            "Check that the folder is a complete diffusers model."
        ) from exc


def load_folder_parts(
    root: Path, classes: dict[str, Any], dtype: torch.dtype, origin: str, missing_hint: Any
) -> dict[str, Any]:
    """Load every `<root>/<name>/` component of a diffusers folder (torch modules in `dtype`);
    a missing one is an error naming the key and `missing_hint(name)`."""
    key = "pretrained_model_name_or_path"
    parts = {}
    for name, cls in classes.items():
        folder = root / name
        if not folder.is_dir():
            raise ConfigError(f"{origin}: key '{key}': {root} has no '{name}/' folder; {missing_hint(name)}")
        torch_dtype = dtype if isinstance(cls, type) and issubclass(cls, torch.nn.Module) else None
        parts[name] = load_component(cls, folder, torch_dtype, key, origin)
    return parts


def apply_overrides(
    parts: dict[str, Any],
    source: ModelSource,
    dtype: torch.dtype,
    transformer_cls: Any,
    family: str = "flux",
    device: torch.device | str = "cpu",
) -> None:
    """pretrained_transformer_* / pretrained_vae_* replace those components of `parts`; each may be
    a diffusers folder or a ComfyUI-format .safetensors file (issue 13)."""
    from diffusers import AutoencoderKL

    from ..quantize import PRECISION_ATTR
    from .fp8_base import FP8_FILE, check_fp8_device, not_fp8_file
    from .single_file import transformer_from_file, vae_from_file

    key = "pretrained_transformer_model_name_or_path"
    if (wf := source.weights_file(key)) is not None:
        fp8_base = source.base_model_precision == FP8_FILE
        if fp8_base:
            check_fp8_device(device, f"{source.origin}: key '{key}': {wf.path.name}")
        parts["transformer"] = transformer_from_file(family, wf, dtype, fp8_base)
    elif (root := source.folder(key)) is not None:
        folder = component_folder(root, source.pretrained_transformer_subfolder, key, source.origin)
        parts["transformer"] = load_component(transformer_cls, folder, dtype, key, source.origin)
    key = "pretrained_vae_model_name_or_path"
    if (wf := source.weights_file(key)) is not None:
        parts["vae"] = vae_from_file(wf, dtype)
    elif (root := source.folder(key)) is not None:
        folder = component_folder(root, "vae", key, source.origin)
        parts["vae"] = load_component(AutoencoderKL, folder, dtype, key, source.origin)
    if (
        source.base_model_precision == FP8_FILE
        and getattr(parts["transformer"], PRECISION_ATTR, None) != FP8_FILE
    ):
        key = "pretrained_transformer_model_name_or_path"
        raise not_fp8_file(f"{source.origin}: key '{key}'", "the transformer given (not a ComfyUI fp8 file)")


@contextmanager
def quiet_progress() -> Iterator[None]:
    """No transformers per-shard progress bars while loading or saving tiny or cached components."""
    was_enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            transformers_logging.enable_progress_bar()


def read_model_index(root: Path) -> dict:
    path = root / "model_index.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(
            f"{path}: not a readable model_index.json ({exc}); re-save or re-download it"
        ) from exc


MARKER_KEY = "_tunegraph"  # in model_index.json; diffusers ignores keys starting with "_"


def folder_flavour(root: Path | None) -> str | None:
    """The flavour `save_pipeline_folder` recorded in a folder's model_index.json, if any."""
    return read_model_index(root).get(MARKER_KEY, {}).get("flavour") if root else None


def save_pipeline_folder(pipeline: Any, directory: str | Path, family: str, flavour: str) -> Path:
    """Save a diffusers pipeline as a folder and record our family and flavour in its model_index.json."""
    directory = Path(directory)
    with quiet_progress():
        pipeline.save_pretrained(str(directory), safe_serialization=True)
    index_path = directory / "model_index.json"
    index = json.loads(index_path.read_text(encoding="utf-8"))
    index[MARKER_KEY] = {"family": family, "flavour": flavour}
    index_path.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return directory
