"""Small generated images with captions, so the demo and the tests have real data without shipping any."""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 210),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 180),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "orange": (240, 140, 30),
}
SHAPES = ("circle", "square", "triangle")


def _draw(
    shape: str, colour: tuple, size: tuple[int, int], rng: random.Random, draw: ImageDraw.ImageDraw
) -> None:
    w, h = size
    r = int(min(w, h) * rng.uniform(0.22, 0.36))
    cx, cy = int(w * rng.uniform(0.4, 0.6)), int(h * rng.uniform(0.4, 0.6))
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=colour)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _combos(seed: int) -> list[tuple[str, str, str]]:
    """Every (shape, foreground, background), shuffled by seed: captions stay unique up to 168 images."""
    combos = [(s, fg, bg) for s in SHAPES for fg in COLOURS for bg in COLOURS if fg != bg]
    random.Random(f"demo:{seed}").shuffle(combos)
    return combos


def demo_image(index: int, size: tuple[int, int], seed: int) -> tuple[Image.Image, str]:
    """One deterministic image and its caption, e.g. "a red circle on a blue background"."""
    combos = _combos(seed)
    shape, fg, bg = combos[index % len(combos)]
    img = Image.new("RGB", size, COLOURS[bg])
    _draw(shape, COLOURS[fg], size, random.Random(f"demo:{seed}:{index}"), ImageDraw.Draw(img))
    return img, f"{_article(fg)} {fg} {shape} on {_article(bg)} {bg} background"


def make_demo_dataset(out_dir: Path, n: int = 8, size: tuple[int, int] = (96, 96), seed: int = 0) -> Path:
    """Write `n` PNGs (`demo_000.png`, ...) with `.txt` captions into out_dir; returns out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img, caption = demo_image(i, size, seed)
        img.save(out / f"demo_{i:03d}.png")
        (out / f"demo_{i:03d}.txt").write_text(caption + "\n", encoding="utf-8")
    return out
