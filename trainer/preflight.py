"""Everything checkable from the config files and the dataset folders, before any weight is loaded
or any cache entry written: keys and paths, the model flavour, adapter targets against the family's
module names (its transformer built on the meta device), every dataset's images, buckets and size,
and each bucket against the model's positional limit. `tunegraph check` prints what it finds;
training runs the same checks first, so a config error costs seconds, not a model load.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import torch

from .adapters import attach_adapter
from .data.backends import Backends, load_backends
from .data.buckets import plan_image
from .data.discovery import Discovery, discover
from .data.sizing import check_dataset_size
from .errors import ConfigError
from .models.loading import ModelSource, folder_flavour
from .models.meta import meta_like, meta_transformer
from .models.registry import get_family

log = logging.getLogger("tunegraph")


class _Warnings(logging.Handler):
    """Collects the warnings the checks log (partly matching targets, ignored keys)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _adapter(cfg: Any, family: Any, transformer: torch.nn.Module | None) -> dict[str, Any]:
    kind = (cfg.lora_type or "standard").lower()
    info: dict[str, Any] = {"type": "lycoris" if kind == "lycoris" else "lora"}
    if kind == "lycoris":
        from .adapters.lycoris_config import read_lycoris_config

        lyco = read_lycoris_config(cfg.input_path("lycoris_config"))
        info.update(algo=lyco["algo"], lycoris_config=str(cfg.input_path("lycoris_config")))
    else:
        info.update(rank=cfg.lora_rank, target=cfg.flux_lora_target)
    if transformer is None:
        info["wrapped_modules"] = None  # no local folder to read the transformer's shape from
        return info
    # init_lokr_norm and PEFT's data-driven inits read weights; the meta model has none
    probe = cfg.replace(init_lokr_norm=None, lora_init_type="default")
    with torch.device("meta"):
        adapter = attach_adapter(transformer, probe, family)
    info["wrapped_modules"] = len(adapter.wrapped_module_names)
    return info


def _dataset(found: Discovery, cfg: Any, family: Any, transformer: torch.nn.Module | None) -> dict[str, Any]:
    spec = found.spec
    plans = [(r, plan_image(r.size, spec, int(cfg.seed or 0), r.content_hash)) for r in found.records]
    buckets = dict(sorted(Counter(p.bucket for _, p in plans).items()))
    if transformer is not None:
        for record, plan in plans:
            problem = family.image_size_problem(transformer, *plan.size)
            if problem:
                raise ConfigError(
                    f"{spec.source}: dataset '{spec.id}': key 'resolution' ({spec.resolution:g}, "
                    f"{spec.resolution_type}): {record.path.name} becomes {problem}"
                )
    if spec.probability > 0:
        batch, accum = cfg.train_batch_size, cfg.gradient_accumulation_steps
        check_dataset_size(
            spec.id, buckets, spec.repeats, batch, accum, spec.source, cfg.disable_bucket_pruning
        )
    return {
        "id": spec.id,
        "folder": str(spec.instance_data_dir),
        "images": len(found.records),
        "skipped": len(found.skipped),
        "repeats": spec.repeats,
        "buckets": buckets,
    }


def _model(cfg: Any, model: Any) -> tuple[Any, torch.nn.Module | None, Any, str]:
    """(family, meta transformer, model folder, flavour): from the config's files, or from a model
    already loaded (a node's): then its own shape, never its weights."""
    if model is not None:
        source = model.source or ModelSource.from_config(cfg)
        return (
            type(model),
            meta_like(model.transformer),
            source.folder("pretrained_model_name_or_path"),
            model.flavour,
        )
    family = get_family(cfg.model_family or "flux")
    source = ModelSource.from_config(cfg)
    transformer = meta_transformer(family, source)
    root = source.folder("pretrained_model_name_or_path")
    return (
        family,
        transformer,
        root,
        family.check_flavour(source.flavour or folder_flavour(root), source.origin),
    )


def preflight(
    cfg: Any,
    backends: Backends | None = None,
    *,
    model: Any = None,
    adapter: bool = True,
    datasets: bool = True,
) -> dict[str, Any]:
    """Run every check that needs no weights; return what would be trained (raises on the first error).
    `model`: one already loaded (a node's), checked by its own shape; `adapter` / `datasets` False
    skip those checks (CacheLatents has no adapter yet; the bench feeds a synthetic batch)."""
    handler = _Warnings()
    log.addHandler(handler)
    try:
        family, transformer, root, flavour = _model(cfg, model)
        info = _adapter(cfg, family, transformer) if adapter else None
        found = []
        if datasets:
            backends = backends or load_backends(cfg)
            found = [_dataset(discover(s), cfg, family, transformer) for s in backends.datasets]
    finally:
        log.removeHandler(handler)
    return {
        "config": cfg.source,
        "family": family.family,
        "flavour": flavour,
        "model": str(root) if root else ("built-in tiny model" if flavour == "tiny" else None),
        "adapter": info,
        "datasets": found,
        "text_embeds_cache": str(backends.text_embeds.cache_dir) if backends else None,
        "output_dir": cfg.output_dir,
        "warnings": list(
            dict.fromkeys(cfg.warnings + (backends.warnings if backends else []) + handler.messages)
        ),
    }


def describe(report: dict[str, Any]) -> str:
    """The report as a few lines for people."""
    a = report["adapter"]
    wrapped = "unknown (no local model folder)" if a["wrapped_modules"] is None else a["wrapped_modules"]
    kind = f"LyCORIS {a['algo']}" if a["type"] == "lycoris" else f"LoRA rank {a['rank']} ({a['target']})"
    lines = [
        f"config:   {report['config']}",
        f"model:    {report['family']} / {report['flavour']} ({report['model'] or 'not found locally'})",
        f"adapter:  {kind}, wrapping {wrapped} modules",
    ]
    for d in report["datasets"]:
        buckets = ", ".join(f"{b}: {n}" for b, n in d["buckets"].items())
        lines.append(
            f"dataset:  {d['id']}: {d['images']} images ({d['skipped']} skipped), repeats {d['repeats']}; "
            f"buckets {buckets}"
        )
    lines.append(f"output:   {report['output_dir']}")
    lines += [f"warning:  {w}" for w in report["warnings"]]
    lines.append("ok: nothing was loaded; `tunegraph train` with this config would start")
    return "\n".join(lines)
