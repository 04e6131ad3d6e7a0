"""LoadDatasetBackend (a multidatabackend.json or one dataset from widgets, chainable), DemoDataset
and CacheLatents (VAE latents + text embeds on disk before training)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from comfy_api.latest import io

from ..trainer.cache.build import prepare_caches
from ..trainer.config import TrainConfig
from ..trainer.data.backends import CAPTION_STRATEGIES, CROP_STYLES, RESOLUTION_TYPES, parse_backends
from ..trainer.data.demo import make_demo_dataset
from ..trainer.errors import ConfigError
from ..trainer.jsonfile import load_json
from ..trainer.names import plain_name
from ..trainer.preflight import preflight
from . import paths
from .handles import CacheHandle, Datasets, TrainingModel
from .run_config import text_embeds_entry
from .runtime import Progress, check_interrupt
from .sockets import CATEGORY, CacheSocket, DatasetsSocket, ModelSocket

NODE = "LoadDatasetBackend"


def cache_root() -> Path:
    return paths.output_dir() / "tunegraph" / "cache"


def _file_entries(config_file: str) -> list[dict[str, Any]]:
    """Image datasets of a multidatabackend.json inside the allowed roots, folders made absolute.
    Its text_embeds entries are dropped: the graph keeps text embeds in its own cache folder."""
    path = paths.input_path(config_file, f"{NODE}: config_file")
    if not path.is_file():
        raise ConfigError(f"{NODE}: config_file '{config_file}' not found (looked for {path})")
    raw = load_json(path)
    if not isinstance(raw, list):
        raise ConfigError(f"{path}: expected a JSON list of datasets")
    entries = []
    for i, entry in enumerate(raw):
        if not isinstance(entry, dict) or entry.get("dataset_type") == "text_embeds":
            continue
        entry = dict(entry)
        if str(entry.get("id", "")).strip():  # it names a cache folder: a plain name (issue 18)
            plain_name(str(entry["id"]), f"{path}: dataset #{i + 1}: key 'id'")
        where = f"{path}: dataset {entry.get('id', f'#{i + 1}')!r}: key"
        if entry.get("instance_data_dir"):
            folder = paths.confine(
                entry["instance_data_dir"], path.parent, paths.comfy_roots(), f"{where} 'instance_data_dir'"
            )
            entry["instance_data_dir"] = str(folder)
        if entry.get("cache_dir_vae"):
            vae_dir = paths.confine(
                entry["cache_dir_vae"], cache_root(), paths.comfy_roots(), f"{where} 'cache_dir_vae'"
            )
            entry["cache_dir_vae"] = str(vae_dir)
        entries.append(entry)
    return entries


def _widget_entry(values: dict[str, Any]) -> dict[str, Any]:
    folder = paths.input_path(values["instance_data_dir"], f"{NODE}: instance_data_dir")
    if not folder.is_dir():
        raise ConfigError(
            f"{NODE}: instance_data_dir '{values['instance_data_dir']}' is not a folder (looked for {folder}); "
            "put the images in ComfyUI's input folder and give the folder name"
        )
    entry = {
        "id": values["dataset_id"].strip() or folder.name,
        "type": "local",
        "instance_data_dir": str(folder),
        "caption_strategy": values["caption_strategy"],
        "resolution": values["resolution"],
        "resolution_type": values["resolution_type"],
        "crop": values["crop"],
        "crop_aspect": "square" if values["crop"] else "preserve",
        "crop_style": values["crop_style"],
        "repeats": values["repeats"],
    }
    if values["instance_prompt"].strip():
        entry["instance_prompt"] = values["instance_prompt"].strip()
    return entry


def check_entries(entries: list[dict[str, Any]], source: str) -> None:
    """Parse them as the trainer will, so mistakes show on this node rather than at training time."""
    cfg = TrainConfig.from_dict({}, source=source)
    parse_backends([*entries, text_embeds_entry(cache_root() / "text")], cfg, source)


class LoadDatasetBackend(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TuneGraphLoadDatasetBackend",
            display_name="Load Dataset Backend",
            category=CATEGORY,
            description="An image dataset from a folder (relative to ComfyUI's input folder), or every image "
            "dataset of a SimpleTuner multidatabackend.json. Chain several to mix them.",
            inputs=[
                io.String.Input(
                    "instance_data_dir", default="", tooltip="image folder (empty when using config_file)"
                ),
                io.String.Input(
                    "config_file", default="", tooltip="a multidatabackend.json instead of the widgets"
                ),
                io.String.Input("dataset_id", default="", tooltip="defaults to the folder name"),
                io.Combo.Input("caption_strategy", options=list(CAPTION_STRATEGIES), default="textfile"),
                io.String.Input("instance_prompt", default=""),
                io.Int.Input("resolution", default=1024, min=16, max=8192, step=16),
                io.Combo.Input("resolution_type", options=list(RESOLUTION_TYPES), default="pixel_area"),
                io.Boolean.Input("crop", default=True),
                io.Combo.Input(
                    "crop_style", options=[s for s in CROP_STYLES if s != "centre"], default="center"
                ),
                io.Int.Input("repeats", default=0, min=0, max=10000),
                DatasetsSocket.Input("datasets", optional=True, tooltip="datasets to mix with this one"),
            ],
            outputs=[DatasetsSocket.Output(display_name="datasets")],
        )

    @classmethod
    def execute(cls, datasets: Datasets | None = None, **values: Any) -> io.NodeOutput:
        if values["config_file"].strip():
            new = _file_entries(values["config_file"])
        elif values["instance_data_dir"].strip():
            new = [_widget_entry(values)]
        else:
            raise ConfigError(f"{NODE}: give either instance_data_dir (an image folder) or config_file")
        entries = [*(datasets.entries if datasets else ()), *new]
        check_entries(entries, NODE)
        return io.NodeOutput(Datasets(tuple(entries)))


class DemoDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TuneGraphDemoDataset",
            display_name="Demo Dataset",
            category=CATEGORY,
            description="Write small generated shape images with captions into ComfyUI's input folder "
            "(once) and output the folder name, for trying a training graph without a dataset.",
            inputs=[
                io.String.Input("folder", default="tunegraph_demo"),
                io.Int.Input("images", default=8, min=1, max=256),
                io.Int.Input("size", default=96, min=16, max=1024, step=16),
            ],
            outputs=[io.String.Output(display_name="instance_data_dir")],
        )

    @classmethod
    def execute(cls, folder: str, images: int, size: int) -> io.NodeOutput:
        target = paths.input_path(folder, "DemoDataset: folder")
        if len(list(target.glob("*.png"))) != images:
            make_demo_dataset(target, n=images, size=(size, size))
        return io.NodeOutput(folder)


class CacheLatents(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TuneGraphCacheLatents",
            display_name="Cache Latents",
            category=CATEGORY,
            description="Encode every dataset image with the VAE and every caption with the text encoders, "
            "into output/tunegraph/cache (content-addressed: unchanged images are not encoded again).",
            inputs=[
                ModelSocket.Input("model"),
                DatasetsSocket.Input("datasets"),
                io.Int.Input("vae_batch_size", default=4, min=1, max=256),
            ],
            outputs=[CacheSocket.Output(display_name="cache")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model: TrainingModel, datasets: Datasets, vae_batch_size: int) -> io.NodeOutput:
        root = cache_root()
        cfg = TrainConfig.from_dict(
            {**model.keys, "vae_batch_size": vae_batch_size, "cache_dir": str(root)}, source="CacheLatents"
        )
        entries = [*datasets.entries, text_embeds_entry(root / "text" / model.family)]
        backends = parse_backends(entries, cfg, "CacheLatents")
        for spec in backends.datasets:
            paths.check_dataset_files(spec.instance_data_dir, f"CacheLatents: dataset '{spec.id}'")
        preflight(cfg, backends, model=model.bundle, adapter=False)  # sizes vs the model, before encoding
        progress = Progress(len(backends.datasets), cls.hidden.unique_id)
        reports, text = [], {}
        for i, spec in enumerate(backends.datasets):
            check_interrupt()
            one = replace(backends, datasets=[spec])
            summary = prepare_caches(cfg, model.bundle, backends=one, progress=False).summary
            reports.extend(summary["datasets"])
            text = summary["text_embeds"]
            progress.update(i + 1, text=f"cached {spec.id}")
        handle = CacheHandle(model, _with_cache_dirs(datasets, backends), backends.text_embeds.cache_dir,
                             {"datasets": reports, "text_embeds": text})  # fmt: skip
        return io.NodeOutput(handle)


def _with_cache_dirs(datasets: Datasets, backends) -> Datasets:
    """The entries with the latent folders the cache really used, so training reads the same ones."""
    by_id = {spec.id: spec for spec in backends.datasets}
    out = []
    for e in datasets.entries:
        spec = by_id.get(str(e.get("id")))
        out.append({**e, "cache_dir_vae": str(spec.cache_dir_vae)} if spec else dict(e))
    return Datasets(tuple(out))
