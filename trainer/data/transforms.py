"""Turn an image file into the pixel tensor the VAE encodes, following a `Plan`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from .buckets import Plan

RESAMPLE = "lanczos"  # part of every latent's cache key: changing it must invalidate the cache


def load_rgb(path: Path) -> Image.Image:
    """Decode fully (so truncation shows up here), honour EXIF rotation, drop alpha onto white."""
    with Image.open(path) as img:
        img.load()
        img = ImageOps.exif_transpose(img)
        if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return img.convert("RGB")


def apply_plan(img: Image.Image, plan: Plan) -> Image.Image:
    if img.size != plan.resize:
        img = img.resize(plan.resize, Image.Resampling.LANCZOS)
    return img.crop(plan.box) if plan.box != (0, 0, *plan.resize) else img


def to_tensor(img: Image.Image) -> torch.Tensor:
    """[3, H, W] float32 in [-1, 1]."""
    array = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def prepare_pixels(path: Path, plan: Plan) -> torch.Tensor:
    return to_tensor(apply_plan(load_rgb(path), plan))
