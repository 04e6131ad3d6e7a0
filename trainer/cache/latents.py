"""VAE latents for one dataset: plan every image, encode only what is not cached, write atomically.

A latent's key hashes the image bytes, the resize size, crop box, resample filter and `model.vae_id`,
so changing an image, a crop or a resolution recomputes exactly the affected latents.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..data.buckets import Plan, plan_image
from ..data.discovery import Discovery, ImageRecord
from ..data.transforms import RESAMPLE, prepare_pixels
from .store import DiskFullError, content_key, entry_path, save_tensors, usable


@dataclass(frozen=True)
class LatentItem:
    record: ImageRecord
    plan: Plan
    key: str
    path: Path


def latent_key(record: ImageRecord, plan: Plan, vae_id: str) -> str:
    return content_key(
        "latents", image=record.content_hash, resize=plan.resize, box=plan.box, resample=RESAMPLE, vae=vae_id
    )


def plan_latents(discovery: Discovery, seed: int, vae_id: str) -> list[LatentItem]:
    spec = discovery.spec
    items = []
    for record in discovery.records:
        plan = plan_image(record.size, spec, seed, record.content_hash)
        key = latent_key(record, plan, vae_id)
        items.append(LatentItem(record, plan, key, entry_path(spec.cache_dir_vae, key)))
    return items


def _batches(items: list[LatentItem], batch_size: int) -> list[list[LatentItem]]:
    """Same-size chunks of at most batch_size (the VAE encodes one shape per call)."""
    by_size: dict[tuple[int, int], list[LatentItem]] = defaultdict(list)
    for item in items:
        by_size[item.plan.size].append(item)
    return [group[i : i + batch_size] for group in by_size.values() for i in range(0, len(group), batch_size)]


def latent_shape(model, item: LatentItem) -> dict[str, tuple[int, ...]] | None:
    """The shape a latent of this item must have: [C, H/f, W/f] for the model's VAE (f = 2^(levels-1))."""
    vae = getattr(model, "vae", None)
    blocks = getattr(getattr(vae, "config", None), "block_out_channels", None)
    if not blocks:
        return None
    factor = 2 ** (len(blocks) - 1)
    w, h = item.plan.size
    return {"latents": (int(model.latent_channels), h // factor, w // factor)}


def _encode_batch(model, batch: list[LatentItem], failed: dict[str, str]) -> int:
    pixels, ok = [], []
    for item in batch:
        try:
            pixels.append(prepare_pixels(item.record.path, item.plan))
            ok.append(item)
        except Exception as e:  # truncated / undecodable files are skipped, never fatal
            failed[item.key] = f"cannot decode image: {e}"
    if not ok:
        return 0
    with torch.no_grad():
        latents = model.encode_images(torch.stack(pixels))
    for item, latent in zip(ok, latents, strict=True):
        if not bool(torch.isfinite(latent).all()):  # never cache a NaN the loss would then chase
            failed[item.key] = "the VAE produced NaN/Inf for this image"
            continue
        meta = {"kind": "latents", "vae_id": str(model.vae_id), "size": item.plan.bucket}
        save_tensors(item.path, {"latents": latent}, meta)
    return len(ok) - sum(item.key in failed for item in ok)


def cache_latents(
    items: list[LatentItem], model, batch_size: int, *, progress: bool = True, desc: str = "latents"
) -> tuple[int, int, dict[str, str]]:
    """Encode the missing latents. Returns (cached, reused, failed: key -> reason) counted over
    unique keys, so the same image listed twice is encoded once."""
    unique = list({item.key: item for item in items}.values())
    missing = [item for item in unique if not usable(item.path, latent_shape(model, item))]
    failed: dict[str, str] = {}
    cached = 0
    with tqdm(
        total=len(missing), desc=desc, unit="img", file=sys.stderr, disable=not progress or not missing
    ) as bar:
        for batch in _batches(missing, max(1, batch_size)):
            try:
                cached += _encode_batch(model, batch, failed)
            except DiskFullError as e:  # say how much the rest needs; what was written stays
                raise DiskFullError(e.folder, e.entry_bytes, len(missing) - cached) from None
            bar.update(len(batch))
    return cached, len(unique) - len(missing), failed
