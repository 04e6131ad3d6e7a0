"""What flows along TuneGraph's own sockets (types prefixed TUNEGRAPH_). Plain frozen records: a node
never mutates what it receives, so ComfyUI may cache and share them between prompts."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class TrainingModel:
    """A loaded model family bundle plus the config keys that name it (model_family, model_flavour,
    pretrained_* paths, mixed_precision, base_model_precision)."""

    bundle: Any
    keys: dict[str, Any]
    fingerprint: str = ""  # what else decides the weights (tiny seed, folder mtime): part of a run's identity

    @property
    def family(self) -> str:
        return self.keys["model_family"]


@dataclass(frozen=True)
class Datasets:
    """multidatabackend.json image entries with absolute folders, in the order they were chained."""

    entries: tuple[dict[str, Any], ...]

    def ids(self) -> list[str]:
        return [e["id"] for e in self.entries]


@dataclass(frozen=True)
class CacheHandle:
    """Latents and text embeds are on disk for these datasets under this model's encoders."""

    model: TrainingModel
    datasets: Datasets
    text_cache_dir: Path
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AdapterHandle:
    """A trained adapter file and, when it came from TrainLoKr, the run folder it came from."""

    path: Path
    family: str = ""
    flavour: str = ""
    steps: int = 0
    output_dir: Path | None = None
    summary: dict[str, Any] = field(default_factory=dict)
