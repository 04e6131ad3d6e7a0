"""Aspect buckets and the resize/crop plan for one image, with SimpleTuner's meaning of resolution.

resolution_type: `pixel_area` -> resolution is an edge whose square is the target area (1024 -> ~1 MP),
`area` -> resolution is megapixels, `pixel` -> resolution is the shorter edge. Bucket sizes are
multiples of 64 px (rounded half up); aspect ratios are rounded to `aspect_bucket_rounding` decimals.

Cropping (crop: true) resizes the image, aspect kept, until it covers the bucket, then cuts the bucket
out (center | corner = top-left | random, seeded). When `maximum_image_size` and
`target_downsample_size` are both set and the image exceeds the maximum, it is first resized to the
target_downsample_size instead (still covering the bucket), so the crop keeps more of the scene's
detail and less of its extent, as SimpleTuner does. Without crop the image is resized to the bucket.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass

from .backends import DatasetSpec

ALIGN = 64


def align(value: float) -> int:
    """Nearest multiple of 64 (half up), at least 64."""
    return max(ALIGN, int(math.floor(value / ALIGN + 0.5)) * ALIGN)


def target_area(spec: DatasetSpec) -> float | None:
    """Target pixel area for area-based resolution types; None for `pixel`."""
    if spec.resolution_type == "pixel_area":
        return float(spec.resolution) ** 2
    if spec.resolution_type == "area":
        return float(spec.resolution) * 1e6
    return None


def bucket_size(aspect: float, spec: DatasetSpec) -> tuple[int, int]:
    """(W, H) of the bucket for an aspect ratio (W/H)."""
    area = target_area(spec)
    if area is None:  # pixel: the shorter edge is the resolution
        short = align(spec.resolution)
        return (align(short * aspect), short) if aspect >= 1 else (short, align(short / aspect))
    edge = align(math.sqrt(area))
    return align(edge * math.sqrt(aspect)), align(edge / math.sqrt(aspect))


def _measure(size: tuple[int, int], resolution_type: str) -> float:
    """An image's size in the unit of `minimum/maximum_image_size` for this resolution type."""
    w, h = size
    if resolution_type == "pixel":
        return min(w, h)
    if resolution_type == "area":
        return w * h / 1e6
    return math.sqrt(w * h)  # pixel_area: compared as an edge, i.e. area against limit**2


def too_small(size: tuple[int, int], spec: DatasetSpec) -> bool:
    return (
        spec.minimum_image_size is not None and _measure(size, spec.resolution_type) < spec.minimum_image_size
    )


def too_large(size: tuple[int, int], spec: DatasetSpec) -> bool:
    if spec.maximum_image_size is None:
        return False
    if spec.resolution_type == "pixel":  # either edge over the limit
        return max(size) > spec.maximum_image_size
    return _measure(size, spec.resolution_type) > spec.maximum_image_size


@dataclass(frozen=True)
class Plan:
    """How one image becomes a training sample: resize to `resize`, then crop `box` (l, t, r, b)."""

    resize: tuple[int, int]
    box: tuple[int, int, int, int]

    @property
    def size(self) -> tuple[int, int]:
        return self.box[2] - self.box[0], self.box[3] - self.box[1]

    @property
    def bucket(self) -> str:
        return f"{self.size[0]}x{self.size[1]}"


def image_rng(seed: int, content_hash: str, purpose: str) -> random.Random:
    """A generator fixed by the run seed and the image bytes, so random crops are cache-stable."""
    digest = hashlib.sha256(f"{seed}:{content_hash}:{purpose}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _aspect(size: tuple[int, int], spec: DatasetSpec, rng: random.Random) -> float:
    natural = round(size[0] / size[1], spec.aspect_bucket_rounding)
    if not spec.crop or spec.crop_aspect == "preserve":
        return natural
    if spec.crop_aspect == "square":
        return 1.0
    if spec.crop_aspect == "closest":
        return min(spec.crop_aspect_buckets, key=lambda a: (abs(a - natural), a))
    return rng.choice(spec.crop_aspect_buckets)  # random


def _downsampled(size: tuple[int, int], spec: DatasetSpec) -> tuple[float, float] | None:
    """Size after target_downsample_size (aspect kept), or None when it does not apply."""
    if spec.target_downsample_size is None or not too_large(size, spec):
        return None
    w, h = size
    t = float(spec.target_downsample_size)
    if spec.resolution_type == "pixel":
        scale = t / min(w, h)
    else:
        scale = math.sqrt((t * t if spec.resolution_type == "pixel_area" else t * 1e6) / (w * h))
    return w * scale, h * scale


def plan_image(size: tuple[int, int], spec: DatasetSpec, seed: int, content_hash: str) -> Plan:
    """Bucket, resize and crop box for an image of `size` (W, H) in this dataset."""
    rng = image_rng(seed, content_hash, "crop")
    bw, bh = bucket_size(_aspect(size, spec, rng), spec)
    if not spec.crop:
        return Plan((bw, bh), (0, 0, bw, bh))
    down = _downsampled(size, spec)
    w, h = down or size
    # Resize to just cover the bucket; a downsampled image keeps its size unless it no longer covers.
    scale = max(bw / w, bh / h, 1.0) if down else max(bw / w, bh / h)
    rw, rh = max(bw, round(w * scale)), max(bh, round(h * scale))
    if spec.crop_style == "center":
        left, top = (rw - bw) // 2, (rh - bh) // 2
    elif spec.crop_style == "corner":
        left, top = 0, 0
    else:
        left, top = rng.randint(0, rw - bw), rng.randint(0, rh - bh)
    return Plan((rw, rh), (left, top, left + bw, top + bh))
