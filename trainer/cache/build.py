"""Build every cache a config needs before training: discover, size-check, encode latents and prompts.

`prepare_caches` returns the cached items the sampler trains on; `build_caches` returns just the
summary `tunegraph cache --json` prints; `build_training_data` returns the sampler itself.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..data.backends import Backends, DatasetSpec, load_backends
from ..data.discovery import Discovery, discover
from ..data.sampler import TrainingData
from ..data.sizing import check_dataset_size
from ..errors import DatasetError
from ..training.phases import offloaded
from .latents import LatentItem, cache_latents, plan_latents
from .ondemand import OnDemandLatents
from .store import load_tensors
from .text_embeds import cache_text_embeds

log = logging.getLogger("tunegraph")


@dataclass(frozen=True)
class CachedItem:
    latent_path: Path
    bucket: str  # "WxH" in pixels
    captions: tuple[str, ...]
    source: LatentItem | None = None  # image + plan, for latents encoded on demand (ondemand.py)


@dataclass
class CachedDataset:
    spec: DatasetSpec
    items: list[CachedItem]


@dataclass
class CachedData:
    """What training reads: per dataset its cached items, and caption -> text-embed file."""

    datasets: list[CachedDataset]
    text_paths: dict[str, Path]
    summary: dict = field(default_factory=dict)
    encoder: OnDemandLatents | None = None  # set when a dataset has vae_cache_ondemand

    def latents(self, items: list[CachedItem]) -> torch.Tensor:
        """[B, C, h, w]: read from the cache (encoded first where a dataset is on demand)."""
        if self.encoder is not None:
            return self.encoder.latents(items)
        return torch.stack([load_tensors(item.latent_path)["latents"] for item in items])


def _setting(cfg: Any, name: str, default: int) -> int:
    value = getattr(cfg, name, None)
    return default if value is None else int(value)


def _buckets(items: list[LatentItem]) -> dict[str, int]:
    return dict(sorted(Counter(item.plan.bucket for item in items).items()))


def _check_size(spec: DatasetSpec, items: list[LatentItem], cfg: Any, found: Discovery) -> None:
    if not items:  # every image failed (e.g. a half-downloaded folder): say how many and why
        reasons = "; ".join(f"{Path(s['path']).name}: {s['reason']}" for s in found.skipped[:3])
        raise DatasetError(
            f"{spec.source}: dataset '{spec.id}': none of its {found.found} files is usable, "
            f"{len(found.skipped)} failed ({reasons}); fix or replace the images"
        )
    if spec.probability > 0:  # a dataset never drawn does not need to fill a batch
        batch, accum = _setting(cfg, "train_batch_size", 1), _setting(cfg, "gradient_accumulation_steps", 1)
        keep = bool(getattr(cfg, "disable_bucket_pruning", False))
        check_dataset_size(spec.id, _buckets(items), spec.repeats, batch, accum, spec.source, keep)


MAX_EDGE = 16384  # px; a bigger bucket would take hours or all memory to encode, never what was meant


def _check_bucket_edges(spec: DatasetSpec, items: list[LatentItem]) -> None:
    big = max((max(item.plan.size) for item in items), default=0)
    if big > MAX_EDGE:
        raise DatasetError(
            f"{spec.source}: dataset '{spec.id}': resolution {spec.resolution:g} ({spec.resolution_type}) "
            f"makes {big} px buckets; at most {MAX_EDGE} px per edge (resolution_type 'area' counts megapixels)"
        )


def _plan_all(backends: Backends, cfg: Any, vae_id: str) -> list[tuple[Discovery, list[LatentItem]]]:
    """Discover and plan every dataset, checking sizes before any encoding starts."""
    planned = []
    for spec in backends.datasets:
        found = discover(spec)
        items = plan_latents(found, _setting(cfg, "seed", 0), vae_id)
        _check_bucket_edges(spec, items)
        _check_size(spec, items, cfg, found)
        planned.append((found, items))
    return planned


def _on_demand(
    encoder: OnDemandLatents, items: list[LatentItem], spec: DatasetSpec, progress: bool
) -> tuple[int, int, dict[str, str]]:
    """(cached, reused, failed) for a vae_cache_ondemand dataset: nothing is encoded now."""
    write = spec.vae_cache_write
    failed = encoder.add(items, write=write, progress=progress, desc=f"checking images {spec.id}")
    keys = {item.key for item in items}
    later = len(keys & encoder.pending)
    if not write:
        log.info(
            "dataset '%s': vae_cache_disable: no latents are encoded now or written; %d will be encoded "
            "each time a batch draws them (the VAE stays on the device)",
            spec.id, later,
        )  # fmt: skip
        return 0, 0, failed
    log.info(
        "dataset '%s': vae_cache_ondemand: no latents are encoded now; %d will be encoded when a batch "
        "first draws them (and written to %s), %d are cached already",
        spec.id, later, spec.cache_dir_vae, len(keys) - later - len(failed),
    )  # fmt: skip
    return 0, len(keys) - later - len(failed), failed


def prepare_caches(cfg: Any, model, *, backends: Backends | None = None, progress: bool = True) -> CachedData:
    """Discover, check and cache everything the config's datasets need; return what training reads."""
    backends = backends or load_backends(cfg)
    vae_batch = _setting(cfg, "vae_batch_size", 4)
    startup = bool(getattr(cfg, "offload_during_startup", False))  # one big component on the device at a time
    datasets, reports, encoder = [], [], None
    for found, items in _plan_all(backends, cfg, str(model.vae_id)):
        spec = found.spec
        if spec.vae_cache_ondemand:  # SimpleTuner skips the VAE cache at startup (ondemand.py)
            encoder = encoder or OnDemandLatents(model)
            cached, reused, failed = _on_demand(encoder, items, spec, progress)
        else:
            with offloaded(getattr(model, "text_encoders", []), startup):
                cached, reused, failed = cache_latents(
                    items, model, vae_batch, progress=progress, desc=f"latents {spec.id}"
                )
        for item in items:
            if item.key in failed:
                found.skip(item.record.path, failed[item.key])
        items = [item for item in items if item.key not in failed]
        if failed:
            _check_size(spec, items, cfg, found)
        datasets.append(
            CachedDataset(spec, [CachedItem(i.path, i.plan.bucket, i.record.captions, i) for i in items])
        )
        reports.append(
            {
                "id": spec.id,
                "images_found": found.found,
                "images_used": len(items),
                "skipped": found.skipped,
                "buckets": _buckets(items),
                "latents_cached": cached,
                "latents_reused": reused,
                **(
                    {"latents_on_demand": len(encoder.pending & {i.key for i in items})}
                    if spec.vae_cache_ondemand
                    else {}
                ),
            }
        )
    captions = [c for d in datasets for item in d.items for c in item.captions]
    with offloaded([model.vae] if hasattr(model, "vae") else [], startup):
        text_paths, text_cached, text_reused = cache_text_embeds(
            captions, model, backends.text_embeds, progress=progress
        )
    summary = {"datasets": reports, "text_embeds": {"cached": text_cached, "reused": text_reused}}
    return CachedData(datasets, text_paths, summary, encoder)


def build_caches(cfg: Any, model, *, progress: bool = True) -> dict:
    """Build the caches; return {"datasets": [...], "text_embeds": {"cached", "reused"}}."""
    return prepare_caches(cfg, model, progress=progress).summary


def build_training_data(cfg: Any, model, *, progress: bool = True) -> TrainingData:
    """Build (or reuse) the caches and return the sampler training reads (`.cached.summary` has the report)."""
    return TrainingData.from_config(cfg, prepare_caches(cfg, model, progress=progress))
