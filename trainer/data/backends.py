"""SimpleTuner's multidatabackend.json: the image datasets and the text-embed cache they train with.

Relative `instance_data_dir` is tried against the working directory, then the multidatabackend file's
folder (as the config resolves paths). Cache folders are relative to the working directory, as in
SimpleTuner. Values may use `{model_family}`, `{output_dir}`, `{id}`, `{env:NAME}` (path_variables.py).
When a dataset names no `cache_dir_vae` its latents go to `<cfg.cache_dir_vae>/<id>`, else
`<cfg.cache_dir or "cache">/vae/<model_family>/<id>`; the text-embed cache defaults likewise to
`<cfg.cache_dir_text>` or `<cfg.cache_dir or "cache">/text/<model_family>`. Both caches are
content-addressed, so sharing a folder between datasets or runs is safe.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import coerce
from ..choices import CAPTION_STRATEGIES, RESOLUTION_TYPES
from ..config import check_range, did_you_mean
from ..config_keys import KEYS
from ..errors import ConfigError
from ..jsonfile import load_json
from ..names import plain_name
from ..simpletuner_options import DATASET_KEYS, DATASET_NO_EFFECT
from .path_variables import fill_entry

log = logging.getLogger("tunegraph")

CROP_ASPECTS = ("square", "preserve", "closest", "random")
CROP_STYLES = ("center", "centre", "random", "corner")
METADATA_BACKENDS = ("discovery", "json")  # both mean "scan the folder" here; parquet carries captions

_COMMON = {"id", "type", "dataset_type", "disabled", "disable"}
IMAGE_KEYS = _COMMON | {
    "instance_data_dir", "caption_strategy", "instance_prompt", "prepend_instance_prompt",
    "only_instance_prompt", "disable_multiline_split", "crop", "crop_aspect", "crop_aspect_buckets",
    "crop_style", "resolution", "resolution_type", "minimum_image_size", "maximum_image_size",
    "target_downsample_size", "repeats", "is_regularisation_data", "is_regularization_data",
    "cache_dir_vae", "probability", "skip_file_discovery", "metadata_backend", "vae_cache_ondemand",
}  # fmt: skip
TEXT_KEYS = _COMMON | {"default", "cache_dir", "write_batch_size", "text_encoder_batch_size"}
# issue 15: every other real SimpleTuner dataset key (trainer/simpletuner_options.json) is accepted;
# set to something that matters it is named in one warning, unless it cannot change what is trained.
NOT_SUPPORTED = set(DATASET_KEYS - IMAGE_KEYS - TEXT_KEYS)


@dataclass(frozen=True)
class DatasetSpec:
    """One image dataset (`dataset_type: image`), every value resolved and coerced."""

    id: str
    instance_data_dir: Path
    caption_strategy: str = "filename"
    instance_prompt: str | None = None
    prepend_instance_prompt: bool = False
    disable_multiline_split: bool = False
    crop: bool = False
    crop_aspect: str = "square"
    crop_aspect_buckets: tuple[float, ...] = ()
    crop_style: str = "random"
    resolution: float = 1024
    resolution_type: str = "pixel_area"
    minimum_image_size: float | None = None
    maximum_image_size: float | None = None
    target_downsample_size: float | None = None
    aspect_bucket_rounding: int = 2
    repeats: int = 0
    is_regularisation_data: bool = False
    probability: float = 1.0
    cache_dir_vae: Path = Path("cache/vae")
    vae_cache_ondemand: bool = False  # latents encoded when a batch draws them (cache/ondemand.py)
    vae_cache_write: bool = True  # False under vae_cache_disable: on-demand latents stay in memory
    source: str = "<multidatabackend>"
    tried_dirs: tuple[Path, ...] = field(default=(), compare=False)


@dataclass(frozen=True)
class TextEmbedSpec:
    id: str
    cache_dir: Path
    write_batch_size: int = 128
    encode_batch_size: int | None = None  # text_encoder_batch_size; None = write_batch_size


@dataclass
class Backends:
    datasets: list[DatasetSpec]
    text_embeds: TextEmbedSpec
    source: str = "<multidatabackend>"
    warnings: list[str] = field(default_factory=list)


def _cfg(cfg: Any, name: str, default: Any = None) -> Any:
    value = getattr(cfg, name, None) if cfg is not None else None
    return default if value is None else value


class _Entry:
    """One dataset's raw dict with coercion helpers whose errors name the file, dataset and key."""

    def __init__(self, raw: dict, source: str, label: str):
        self.raw, self.source, self.label = raw, source, label

    def where(self, key: str) -> str:
        return f"{self.source}: dataset {self.label}: key '{key}'"

    def get(self, key: str, fn, default: Any = None) -> Any:
        if key not in self.raw:
            return default
        value = coerce.to_optional(fn, self.raw[key], self.where(key))
        return default if value is None else value

    def choice(self, key: str, choices: tuple[str, ...], default: str) -> str:
        value = self.get(key, coerce.to_str, default).strip().lower()
        if value not in choices:
            hint = did_you_mean(value, choices)
            raise ConfigError(f"{self.where(key)}: {value!r} is not one of {', '.join(choices)}{hint}")
        return value

    def positive(self, key: str, default: float | None) -> float | None:
        value = self.get(key, coerce.to_float, default)
        if value is not None:
            check_range(KEYS[key], value, self.where(key))  # the config key's range (issue 18)
        return value

    def limit(self, key: str, default: float | None) -> float | None:
        """An optional size limit: 0 or unset means none (SimpleTuner configs write 0)."""
        value = self.get(key, coerce.to_float, default)
        if value is not None and not math.isfinite(value):
            raise ConfigError(f"{self.where(key)}: {value} is not a finite number")
        if value is not None and value < 0:
            raise ConfigError(f"{self.where(key)} must be 0 (no limit) or more, got {value}")
        return value or None


def _check_keys(entry: _Entry, allowed: set[str], ignored: list[str]) -> None:
    for key in entry.raw:
        if key in allowed:
            continue
        if key in NOT_SUPPORTED:
            value = entry.raw[key]
            if key not in DATASET_NO_EFFECT and value not in (None, False, "", [], {}):
                ignored.append(f"{entry.label}: {key}={value!r}")
            continue
        hint = did_you_mean(key, sorted(allowed | NOT_SUPPORTED))
        raise ConfigError(f"{entry.source}: dataset {entry.label}: unknown key '{key}'{hint}")


def _find_dir(value: str, base_dir: Path | None) -> tuple[Path, tuple[Path, ...]]:
    """First existing candidate (cwd, then the backend file's folder), else the cwd one."""
    p = Path(value).expanduser()
    if p.is_absolute():
        return p, (p,)
    tried = tuple([Path.cwd() / p] + ([base_dir / p] if base_dir else []))
    return next((c for c in tried if c.exists()), tried[0]), tried


def _cache_root(cfg: Any) -> Path:
    return Path(_cfg(cfg, "cache_dir", "cache"))


def _family(cfg: Any) -> str:
    return str(_cfg(cfg, "model_family", "flux"))


def _aspect_buckets(entry: _Entry) -> tuple[float, ...]:
    raw = entry.raw.get("crop_aspect_buckets") or []
    if not isinstance(raw, list):
        raise ConfigError(
            f"{entry.where('crop_aspect_buckets')} expects a list of aspect ratios like [1.0, 1.5]"
        )
    out = []
    for item in raw:  # SimpleTuner also allows {"aspect": a, "weight": w}; we use the aspect
        value = item.get("aspect") if isinstance(item, dict) else item
        out.append(coerce.to_float(value, entry.where("crop_aspect_buckets")))
    if any(a <= 0 for a in out):
        raise ConfigError(f"{entry.where('crop_aspect_buckets')}: aspect ratios must be > 0")
    return tuple(out)


def _image_spec(entry: _Entry, cfg: Any, base_dir: Path | None) -> DatasetSpec:
    e = entry
    if "instance_data_dir" not in e.raw or not str(e.raw["instance_data_dir"]).strip():
        raise ConfigError(f"{e.source}: dataset {e.label} needs 'instance_data_dir' (the image folder)")
    folder, tried = _find_dir(e.get("instance_data_dir", coerce.to_str), base_dir)
    strategy = e.choice("caption_strategy", CAPTION_STRATEGIES, _cfg(cfg, "caption_strategy", "filename"))
    prompt = e.get("instance_prompt", coerce.to_str, _cfg(cfg, "instance_prompt"))
    if e.get("only_instance_prompt", coerce.to_bool, False):
        strategy = "instanceprompt"
    prepend = e.get("prepend_instance_prompt", coerce.to_bool, False)
    if (strategy == "instanceprompt" or prepend) and not prompt:
        raise ConfigError(
            f"{e.where('instance_prompt')}: caption_strategy '{strategy}' needs an instance_prompt"
        )
    crop_aspect = e.choice("crop_aspect", CROP_ASPECTS, "square")
    buckets = _aspect_buckets(e)
    crop = e.get("crop", coerce.to_bool, False)
    if crop and crop_aspect in ("closest", "random") and not buckets:
        raise ConfigError(
            f"{e.where('crop_aspect')}: '{crop_aspect}' needs 'crop_aspect_buckets', e.g. [1.0, 1.5]"
        )
    repeats = e.get("repeats", coerce.to_int, 0)
    if repeats < 0:
        raise ConfigError(f"{e.where('repeats')} must be 0 or more (0 = each image once per epoch)")
    probability = e.get("probability", coerce.to_float, 1.0)
    if not math.isfinite(probability) or probability < 0:
        raise ConfigError(f"{e.where('probability')} must be 0 or more")
    e.choice("metadata_backend", METADATA_BACKENDS, "discovery")  # where SimpleTuner keeps metadata
    vae_default = (
        Path(_cfg(cfg, "cache_dir_vae")) / e.raw["id"]
        if _cfg(cfg, "cache_dir_vae")
        else _cache_root(cfg) / "vae" / _family(cfg) / e.raw["id"]
    )
    regularisation = e.get("is_regularisation_data", coerce.to_bool, None)
    if regularisation is None:
        regularisation = e.get("is_regularization_data", coerce.to_bool, False)
    return DatasetSpec(
        id=e.raw["id"],
        instance_data_dir=folder,
        caption_strategy=strategy,
        instance_prompt=prompt,
        prepend_instance_prompt=prepend,
        disable_multiline_split=e.get("disable_multiline_split", coerce.to_bool, False),
        crop=crop,
        crop_aspect=crop_aspect,
        crop_aspect_buckets=buckets,
        crop_style=e.choice("crop_style", CROP_STYLES, "random").replace("centre", "center"),
        resolution=e.positive("resolution", _cfg(cfg, "resolution", 1024)),
        resolution_type=e.choice(
            "resolution_type", RESOLUTION_TYPES, _cfg(cfg, "resolution_type", "pixel_area")
        ),
        minimum_image_size=e.limit("minimum_image_size", _cfg(cfg, "minimum_image_size")),
        maximum_image_size=e.limit("maximum_image_size", _cfg(cfg, "maximum_image_size")),
        target_downsample_size=e.limit("target_downsample_size", _cfg(cfg, "target_downsample_size")),
        aspect_bucket_rounding=int(_cfg(cfg, "aspect_bucket_rounding", 2)),
        repeats=repeats,
        is_regularisation_data=regularisation,
        probability=probability,
        cache_dir_vae=Path(e.get("cache_dir_vae", coerce.to_str, str(vae_default))),
        # SimpleTuner (v4.6+): the config's key applies to every dataset, the entry's to its own
        # vae_cache_disable (config.json only, as in SimpleTuner) implies on demand, never written
        vae_cache_ondemand=bool(_cfg(cfg, "vae_cache_ondemand", False))
        or bool(_cfg(cfg, "vae_cache_disable", False))
        or e.get("vae_cache_ondemand", coerce.to_bool, False),
        vae_cache_write=not _cfg(cfg, "vae_cache_disable", False),
        source=e.source,
        tried_dirs=tried,
    )


def _text_spec(entry: _Entry) -> TextEmbedSpec:
    cache_dir = entry.get("cache_dir", coerce.to_str)
    write = entry.get("write_batch_size", coerce.to_int, 0)
    encode = entry.get("text_encoder_batch_size", coerce.to_int, None)
    if write < 0 or (encode is not None and encode < 1):
        raise ConfigError(f"{entry.where('write_batch_size')}: batch sizes must be at least 1")
    return TextEmbedSpec(entry.raw["id"], Path(cache_dir) if cache_dir else None, write or 0, encode)


def _pick_text(specs: list[tuple[TextEmbedSpec, bool]], cfg: Any, source: str) -> TextEmbedSpec:
    defaults = [s for s, is_default in specs if is_default]
    if len(defaults) > 1:
        names = ", ".join(repr(s.id) for s in defaults)
        raise ConfigError(
            f"{source}: more than one text_embeds dataset has default: true ({names}); keep one"
        )
    chosen = defaults[0] if defaults else (specs[0][0] if specs else None)
    fallback = _cfg(cfg, "cache_dir_text") or _cache_root(cfg) / "text" / _family(cfg)
    write = _cfg(cfg, "write_batch_size", 128)
    if chosen is None:
        return TextEmbedSpec("text-embeds", Path(fallback), write)
    return TextEmbedSpec(
        chosen.id,
        chosen.cache_dir or Path(fallback),
        chosen.write_batch_size or write,
        chosen.encode_batch_size,
    )


def parse_backends(entries: list[dict], cfg: Any, source: str, base_dir: Path | None = None) -> Backends:
    """Parse multidatabackend entries. `base_dir` is the folder relative data dirs are also tried in
    (defaults to the folder of `source` when that is a file)."""
    if not isinstance(entries, list):
        raise ConfigError(f"{source}: expected a JSON list of datasets, got {type(entries).__name__}")
    if base_dir is None and Path(source).is_file():
        base_dir = Path(source).resolve().parent
    datasets, texts, ignored, seen = [], [], [], set()
    for index, raw in enumerate(entries):
        if not isinstance(raw, dict):
            raise ConfigError(
                f"{source}: dataset #{index + 1} must be a JSON object, got {type(raw).__name__}"
            )
        if not str(raw.get("id", "")).strip():
            raise ConfigError(f"{source}: dataset #{index + 1} has no 'id'; give each dataset a unique id")
        raw = fill_entry({**raw, "id": str(raw["id"])}, _family(cfg), _cfg(cfg, "output_dir"))
        raw["id"] = plain_name(str(raw["id"]), f"{source}: dataset #{index + 1}: key 'id'")  # a folder name
        entry = _Entry(raw, source, repr(raw["id"]))
        if raw["id"] in seen:
            raise ConfigError(f"{source}: dataset id {raw['id']!r} is used twice; ids must be unique")
        seen.add(raw["id"])
        kind = entry.get("type", coerce.to_str, "local")
        if kind != "local":
            raise ConfigError(f"{entry.where('type')}: {kind!r} is not supported; only 'local' folders are")
        dataset_type = entry.get("dataset_type", coerce.to_str, "image")
        if dataset_type not in ("image", "text_embeds"):
            raise ConfigError(
                f"{entry.where('dataset_type')}: {dataset_type!r} is not supported; use 'image' or 'text_embeds'"
            )
        _check_keys(entry, IMAGE_KEYS if dataset_type == "image" else TEXT_KEYS, ignored)
        disabled = entry.get("disabled", coerce.to_bool, False) or entry.get("disable", coerce.to_bool, False)
        if dataset_type == "text_embeds":
            if not disabled:
                texts.append((_text_spec(entry), entry.get("default", coerce.to_bool, False)))
        elif not disabled:
            datasets.append(_image_spec(entry, cfg, base_dir))
    warnings = []
    if ignored:
        warnings.append(
            f"{source}: SimpleTuner dataset keys not implemented by TuneGraph yet, ignored: "
            + "; ".join(ignored)
        )
        log.warning(warnings[-1])
    if not datasets:
        raise ConfigError(
            f"{source}: no enabled image dataset; add one with 'instance_data_dir' or set disabled: false"
        )
    if all(d.probability == 0 for d in datasets):
        raise ConfigError(
            f"{source}: every dataset has probability 0; give at least one a positive probability"
        )
    return Backends(datasets, _pick_text(texts, cfg, source), source, warnings)


def load_backends(cfg: Any, path: str | Path | None = None) -> Backends:
    """Read the config's `data_backend_config` (or `path`) and parse it."""
    p = Path(path) if path is not None else cfg.input_path("data_backend_config")
    return parse_backends(load_json(p), cfg, str(p), base_dir=p.resolve().parent)
