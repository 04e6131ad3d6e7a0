"""Text-encoder outputs per caption, keyed by (caption, model.text_encoder_id).

Each entry stores the tensors `model.encode_prompts` returns for one caption, without the batch dim.
The empty caption "" is always cached: caption dropout trains on it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from tqdm import tqdm

from ..data.backends import TextEmbedSpec
from ..errors import TrainingError
from .store import DiskFullError, content_key, entry_path, load_tensors, save_tensors, usable


def text_key(caption: str, text_encoder_id: str) -> str:
    return content_key("text_embeds", caption=caption, encoder=text_encoder_id)


def text_path(spec: TextEmbedSpec, caption: str, text_encoder_id: str) -> Path:
    return entry_path(spec.cache_dir, text_key(caption, text_encoder_id))


def _write_chunk(model, spec: TextEmbedSpec, chunk: list[str]) -> None:
    with torch.no_grad():
        out = model.encode_prompts(list(chunk))
    tensors = {name: t for name, t in out.items() if t is not None}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TrainingError(
                f"encode_prompts returned '{name}' as {type(t).__name__}; the cache stores tensors"
            )
    for name, t in tensors.items():
        if t.shape[0] != len(chunk):
            raise TrainingError(
                f"encode_prompts returned '{name}' with batch {t.shape[0]} for {len(chunk)} prompts"
            )
    for i, caption in enumerate(chunk):
        meta = {
            "kind": "text_embeds",
            "text_encoder_id": str(model.text_encoder_id),
            "caption": caption[:500],
        }
        save_tensors(
            text_path(spec, caption, model.text_encoder_id), {n: t[i] for n, t in tensors.items()}, meta
        )


def cache_text_embeds(
    captions: list[str], model, spec: TextEmbedSpec, *, progress: bool = True
) -> tuple[dict[str, Path], int, int]:
    """Ensure an entry for each caption (plus ""). Returns (caption -> file, cached, reused)."""
    unique = sorted(set(captions) | {""})
    paths = {c: text_path(spec, c, model.text_encoder_id) for c in unique}
    missing = [c for c in unique if not usable(paths[c])]
    step = max(1, spec.encode_batch_size or spec.write_batch_size or 1)
    with tqdm(
        total=len(missing),
        desc="text embeds",
        unit="prompt",
        file=sys.stderr,
        disable=not progress or not missing,
    ) as bar:
        for i in range(0, len(missing), step):
            try:
                _write_chunk(model, spec, missing[i : i + step])
            except DiskFullError as e:  # say how much the rest needs; what was written stays
                raise DiskFullError(e.folder, e.entry_bytes, len(missing) - i) from None
            bar.update(len(missing[i : i + step]))
    return paths, len(missing), len(unique) - len(missing)


def load_embeds(paths: list[Path]) -> dict[str, torch.Tensor]:
    """Stack per-caption entries into a batch: {name: Tensor[B, ...]}."""
    entries = [load_tensors(p) for p in paths]
    names = entries[0].keys()
    out = {}
    for name in names:
        parts = [e[name] for e in entries]
        if len({tuple(p.shape) for p in parts}) > 1:
            shapes = sorted({tuple(p.shape) for p in parts})
            raise TrainingError(
                f"text embeds '{name}' differ in shape across captions {shapes}; clear the text cache"
            )
        out[name] = torch.stack(parts)
    return out
