"""SimpleTuner's `vae_cache_ondemand`: latents encoded when a batch draws their image, not at startup.

What SimpleTuner does (helpers/caching/vae.py `VAECache.encode_images`, training/collate.py
`compute_latents`, identical from v0.9.8.3 to v4.8.0): at startup the VAE cache is not filled; when a
batch is collated, each image whose latent file is missing is loaded, cropped/bucketed as for the
cache, encoded, and its latent *written to the dataset's VAE cache*, so later visits read it; the VAE
stays loaded on the device for the whole run (trainer.py `init_unload_vae` returns early).

TuneGraph does the same with its own cache: the same key, plan and file as a startup cache, so an
on-demand run and a cached run train on the same latents (the posterior mode, see models/base.py;
SimpleTuner draws one posterior sample per image in both paths and caches that). Images that cannot
be decoded are found at startup (decoded, not encoded) and skipped and counted as the cache skips them,
so the epoch plan never changes mid-run. Each image is encoded in a VAE call of its own: a batched
convolution rounds differently with 1 image than with several (~7e-7 on CPU), so this way a latent
is one function of its image, whichever batch, process (DDP ranks may both write an entry: the same
bytes) or resumed run encodes it, and a resumed run stays bit-exact with an uninterrupted one.

`vae_cache_disable` (SimpleTuner: "implicitly enables on-demand caching and disables writing
embeddings to disk") is the same with nothing written: such images are encoded again each time a
batch draws them (SimpleTuner draws a new posterior sample then; we encode the mode, so the latent
and the trained weights equal the cached path's, for more VAE time and no disk).
"""

from __future__ import annotations

import copy
import sys
from typing import Any

import torch
from tqdm import tqdm

from ..data.transforms import prepare_pixels
from ..errors import TrainingError
from .latents import LatentItem, latent_shape
from .store import load_tensors, save_tensors, usable


class OnDemandLatents:
    """Latents for training batches: read from the cache, encoded and written first where pending."""

    def __init__(self, model: Any):
        # The VAE and device only: a view without text encoders, so holding it never keeps them alive.
        self.model = copy.copy(model)
        self.model.text_encoders = []
        self.pending: set[str] = set()  # keys to encode when first drawn
        self.unwritten: set[str] = set()  # vae_cache_disable: encoded on every draw, never written

    def add(
        self, items: list[LatentItem], *, write: bool = True, progress: bool = True, desc: str = ""
    ) -> dict[str, str]:
        """Take a dataset's items: those without a usable cached latent (all of them when not
        `write`) are decoded now (not encoded) and become pending; returns key -> reason for those
        that cannot be decoded (the startup cache's reason), which the caller skips."""
        unique = {i.key: i for i in items}.values()
        todo = [i for i in unique if not write or not usable(i.path, latent_shape(self.model, i))]
        failed: dict[str, str] = {}
        for item in tqdm(todo, desc=desc, unit="img", file=sys.stderr, disable=not progress or not todo):
            try:
                prepare_pixels(item.record.path, item.plan)
            except Exception as e:  # truncated / undecodable files are skipped, never fatal
                failed[item.key] = f"cannot decode image: {e}"
        self.pending |= {i.key for i in todo if i.key not in failed}
        if not write:
            self.unwritten |= {i.key for i in todo if i.key not in failed}
        return failed

    def latents(self, items: list[Any]) -> torch.Tensor:
        """[B, C, h, w] for `items` (build.CachedItem); pending ones are encoded now and written to
        the cache (kept in memory only under vae_cache_disable); the rest are read from the cache."""
        out = []
        for item in items:
            key = item.source.key if item.source is not None else None
            if key in self.unwritten:
                out.append(self._encode(item.source).detach().to("cpu"))  # as a cache file reads back
                continue
            if key in self.pending:
                save_tensors(
                    item.source.path, {"latents": self._encode(item.source)}, self._meta(item.source)
                )
                self.pending.discard(key)
            out.append(load_tensors(item.latent_path)["latents"])
        return torch.stack(out)

    def _meta(self, item: LatentItem) -> dict[str, str]:
        return {"kind": "latents", "vae_id": str(self.model.vae_id), "size": item.plan.bucket}

    def _encode(self, item: LatentItem) -> torch.Tensor:
        """One image per VAE call (see the module docstring)."""
        try:
            pixels = prepare_pixels(item.record.path, item.plan)
        except Exception as e:  # decodable at startup: the file changed while training ran
            raise TrainingError(
                f"vae_cache_ondemand: {item.record.path} cannot be decoded any more ({e}); it was readable "
                "when the run started: restore it and resume"
            ) from None
        with torch.no_grad():
            (latent,) = self.model.encode_images(pixels[None])
        if not bool(torch.isfinite(latent).all()):
            raise TrainingError(
                f"vae_cache_ondemand: the VAE produced NaN/Inf for {item.record.path}; remove the image, "
                "or turn vae_cache_ondemand off so that caching skips it"
            )
        return latent
