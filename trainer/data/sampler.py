"""`TrainingData`: deterministic, resumable batches of cached latents and text embeds.

An epoch is planned from (seed, epoch) alone: every dataset's samples (each image repeats + 1 times)
are grouped by bucket, shuffled, cut into train_batch_size batches (a remainder that cannot fill a
batch is dropped), and the datasets' batches are interleaved by drawing a dataset at each step with
weight `probability` among those with batches left, until all are used. With N processes (shard()),
batches are N x train_batch_size and each process loads its own slice. So every epoch has the same
number of steps (`len(data)`), and `state_dict()` = (epoch, position) is all a resumed run needs to
continue with exactly the batches an uninterrupted run would have seen.

Each batch: {"latents": Tensor[B, C, h, w], "embeds": {name: Tensor[B, ...]}, "captions": [str],
"dataset_ids": [str], "is_regularisation_data": [bool]}. A caption is one line of the image's captions
(chosen by the seeded generator) or "" when dropped with caption_dropout_probability.
"""

from __future__ import annotations

import logging
import random
from collections import defaultdict
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ..cache.text_embeds import load_embeds
from ..errors import DatasetError, TrainingError

if TYPE_CHECKING:  # build.py imports this module to make TrainingData
    from ..cache.build import CachedData

log = logging.getLogger("tunegraph")

Ref = tuple[int, int]  # (dataset index, item index)


def _rng(*parts: Any) -> random.Random:
    return random.Random(":".join(str(p) for p in parts))  # str seeds hash stably across runs


class TrainingData:
    def __init__(
        self,
        cached: CachedData,
        batch_size: int,
        seed: int = 0,
        caption_dropout_probability: float = 0.0,
        keep_small_buckets: bool = False,
    ):
        if batch_size < 1:
            raise DatasetError("train_batch_size must be at least 1")
        self.cached, self.batch_size, self.seed = cached, batch_size, seed
        self.caption_dropout_probability = caption_dropout_probability
        # SimpleTuner's disable_bucket_pruning: a bucket smaller than one batch is kept, its batch
        # filled up with its own images again, as SimpleTuner's sampler fills from seen images.
        self.keep_small_buckets = keep_small_buckets
        self.epoch, self.position = 0, 0
        self.rank, self.world_size = 0, 1  # see shard()
        # For validation prompts' <token>: the first training (not regularisation) dataset's prompt.
        specs = sorted((d.spec for d in cached.datasets), key=lambda s: s.is_regularisation_data)
        self.instance_prompt: str | None = next((s.instance_prompt for s in specs if s.instance_prompt), None)
        self._plan: tuple[int, list[list[Ref]]] | None = None
        if len(self) == 0:
            raise DatasetError(
                f"no dataset can fill a batch of train_batch_size {batch_size}; raise 'repeats'"
            )

    @classmethod
    def from_config(cls, cfg: Any, cached: CachedData) -> TrainingData:
        return cls(
            cached,
            int(cfg.train_batch_size),
            int(cfg.seed or 0),
            float(cfg.caption_dropout_probability or 0),
            keep_small_buckets=bool(getattr(cfg, "disable_bucket_pruning", False)),
        )

    def shard(self, rank: int, world_size: int) -> None:
        """Plan global batches of batch_size x world_size; this process loads slice `rank` of each,
        so the processes together see exactly the batches one process with the global batch would."""
        self.rank, self.world_size, self._plan = int(rank), int(world_size), None
        if len(self) == 0:
            raise DatasetError(
                f"no dataset can fill a global batch of train_batch_size {self.batch_size} x {world_size} "
                "processes; raise 'repeats' or lower train_batch_size"
            )

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    # -- planning ---------------------------------------------------------------------------------
    def _dataset_batches(self, d: int, epoch: int) -> list[list[Ref]]:
        ds = self.cached.datasets[d]
        buckets: dict[str, list[Ref]] = defaultdict(list)
        for i, item in enumerate(ds.items):
            buckets[item.bucket] += [(d, i)] * (ds.spec.repeats + 1)
        rng = _rng(self.seed, epoch, "dataset", ds.spec.id)
        batches = []
        for bucket in sorted(buckets):
            refs = buckets[bucket]
            rng.shuffle(refs)
            size = self.global_batch_size
            if self.keep_small_buckets and len(refs) < size:
                refs = refs + [rng.choice(refs) for _ in range(size - len(refs))]
            full = len(refs) // size * size
            batches += [refs[j : j + size] for j in range(0, full, size)]
        rng.shuffle(batches)
        return batches

    def epoch_plan(self, epoch: int) -> list[list[Ref]]:
        """The batches of an epoch, in order, as (dataset index, item index) references."""
        if self._plan and self._plan[0] == epoch:
            return self._plan[1]
        queues = {
            d: self._dataset_batches(d, epoch)
            for d, ds in enumerate(self.cached.datasets)
            if ds.spec.probability > 0
        }
        rng = _rng(self.seed, epoch, "mix")
        order = []
        while any(queues.values()):
            live = [d for d, q in queues.items() if q]
            d = rng.choices(live, weights=[self.cached.datasets[k].spec.probability for k in live])[0]
            order.append(queues[d].pop(0))
        self._plan = (epoch, order)
        return order

    def __len__(self) -> int:
        """Steps (batches) per epoch; the same for every epoch."""
        return len(self.epoch_plan(self.epoch))

    # -- iteration and resume ---------------------------------------------------------------------
    def next_batch(self) -> dict:
        """The next batch, moving to the next epoch when this one is used up."""
        if self.position >= len(self):
            self.epoch, self.position = self.epoch + 1, 0
        refs = self.epoch_plan(self.epoch)[self.position]
        batch = self._load(refs, self.epoch, self.position)
        self.position += 1
        return batch

    def __iter__(self) -> Iterator[dict]:
        """The remaining batches of the current epoch (the next epoch's, if this one is done)."""
        if self.position >= len(self):
            self.epoch, self.position = self.epoch + 1, 0
        epoch = self.epoch
        while self.epoch == epoch and self.position < len(self):
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "steps_per_epoch": len(self),
        }

    def load_state_dict(self, state: dict) -> None:
        epoch, position = int(state["epoch"]), int(state["position"])
        if state.get("seed", self.seed) != self.seed:
            raise TrainingError(f"resume: data seed {state['seed']} differs from this run's seed {self.seed}")
        self.epoch, self.position = epoch, 0
        saved_steps = int(state.get("steps_per_epoch") or len(self))
        if saved_steps != len(self):
            # Another global batch (process count x train_batch_size): continue as far into the epoch.
            position = min(position * len(self) // saved_steps, len(self))
            log.warning(
                "resume: an epoch had %d steps and now has %d (the global batch changed); it continues "
                "at step %d, with another batch order than the run that saved it",
                saved_steps,
                len(self),
                position,
            )
        if not 0 <= position <= len(self):
            raise TrainingError(f"resume: data position {position} is outside an epoch of {len(self)} steps")
        self.position = position

    def eval_items(self, n: int) -> list[dict]:
        """A fixed set of n single items (first captions, no dropout) for the stable eval loss:
        the first items of each dataset in turn, so it never depends on the epoch or the RNG."""
        refs = [
            (d, i)
            for i in range(max(len(ds.items) for ds in self.cached.datasets))
            for d, ds in enumerate(self.cached.datasets)
            if i < len(ds.items)
        ][:n]
        out = []
        for d, i in refs:
            item = self.cached.datasets[d].items[i]
            embeds = load_embeds([self.cached.text_paths[item.captions[0]]])
            out.append(
                {
                    "latents": self.cached.latents([item])[0],
                    "embeds": {k: v[0] for k, v in embeds.items()},
                }
            )
        return out

    # -- loading ----------------------------------------------------------------------------------
    def _caption(self, rng: random.Random, captions: tuple[str, ...]) -> str:
        caption = rng.choice(captions)
        return "" if rng.random() < self.caption_dropout_probability else caption

    def _load(self, refs: list[Ref], epoch: int, position: int) -> dict:
        rng = _rng(self.seed, epoch, position, "captions")
        items = [(self.cached.datasets[d], self.cached.datasets[d].items[i]) for d, i in refs]
        captions = [self._caption(rng, item.captions) for _, item in items]  # drawn for the global batch
        if self.world_size > 1:
            mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
            items, captions = items[mine], captions[mine]
        return {
            "latents": self.cached.latents([item for _, item in items]),
            "embeds": load_embeds([self.cached.text_paths[c] for c in captions]),
            "captions": captions,
            "dataset_ids": [ds.spec.id for ds, _ in items],
            "is_regularisation_data": [ds.spec.is_regularisation_data for ds, _ in items],
        }
