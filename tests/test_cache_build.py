"""Latent and text-embed caches end to end with the real tiny model: reuse, invalidation, batching,
bad images, the too-small error, and the reference Flux / HiDream multidatabackend shapes."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tunegraph.trainer.cache.build import build_caches, prepare_caches
from tunegraph.trainer.config import TrainConfig, load_config
from tunegraph.trainer.data.demo import make_demo_dataset
from tunegraph.trainer.errors import DatasetError
from tunegraph.trainer.jsonfile import load_json
from tunegraph.trainer.models import FAMILIES, load_model

REFS = Path(__file__).parent / "data" / "reference-configs"
_MODELS = {}


def tiny(family="flux"):
    if family not in _MODELS:
        _MODELS[family] = load_model(TrainConfig.from_dict({"model_family": family, "model_flavour": "tiny"}))
    return _MODELS[family]


class Recorder:
    """The real model, noting the batch sizes it was called with."""

    def __init__(self, model):
        self.model, self.image_batches, self.prompt_batches = model, [], []
        self.vae_id, self.text_encoder_id = model.vae_id, model.text_encoder_id

    def encode_images(self, pixels):
        self.image_batches.append(tuple(pixels.shape))
        return self.model.encode_images(pixels)

    def encode_prompts(self, prompts):
        self.prompt_batches.append(len(prompts))
        return self.model.encode_prompts(prompts)


def setup(tmp_path, monkeypatch, datasets, n=6, size=(96, 72), **cfg):
    monkeypatch.chdir(tmp_path)
    make_demo_dataset(tmp_path / "data", n=n, size=size)
    text = {"id": "text", "dataset_type": "text_embeds", "cache_dir": "cache/text", "write_batch_size": 4}
    (tmp_path / "mdb.json").write_text(json.dumps(datasets + [text]))
    values = {"model_family": "flux", "model_flavour": "tiny", "data_backend_config": "mdb.json", "seed": 7}
    return TrainConfig.from_dict({**values, **cfg})


def ds(id, **keys):
    base = {"id": id, "instance_data_dir": "data", "caption_strategy": "textfile", "resolution": 64}
    return {**base, "cache_dir_vae": f"cache/vae/{id}", **keys}


def by_id(summary):
    return {d["id"]: d for d in summary["datasets"]}


def test_summary_shape_then_a_rerun_reuses_everything(tmp_path, monkeypatch):
    cfg = setup(tmp_path, monkeypatch, [ds("a", crop=True, crop_style="random")])
    first = build_caches(cfg, tiny(), progress=False)
    assert first == {
        "datasets": [
            {"id": "a", "images_found": 6, "images_used": 6, "skipped": [], "buckets": {"64x64": 6},
             "latents_cached": 6, "latents_reused": 0}
        ],
        "text_embeds": {"cached": 7, "reused": 0},  # 6 captions + the empty one for caption dropout
    }  # fmt: skip
    assert len(list((tmp_path / "cache/vae/a").glob("*.safetensors"))) == 6
    second = build_caches(cfg, tiny(), progress=False)
    assert by_id(second)["a"]["latents_cached"] == 0 and by_id(second)["a"]["latents_reused"] == 6
    assert second["text_embeds"] == {"cached": 0, "reused": 7}


def test_cached_latents_equal_a_direct_encode(tmp_path, monkeypatch):
    cfg = setup(tmp_path, monkeypatch, [ds("a", crop=True, crop_style="center")], n=1, size=(96, 96))
    cached = prepare_caches(cfg, tiny(), progress=False)
    latent = load_file(str(cached.datasets[0].items[0].latent_path))["latents"]
    with Image.open(tmp_path / "data/demo_000.png") as img:  # 96x96 -> 64x64 square: a plain resize
        pixels = torch.from_numpy(np.array(img.convert("RGB").resize((64, 64), Image.Resampling.LANCZOS)))
    pixels = (pixels.float().permute(2, 0, 1) / 127.5 - 1).unsqueeze(0)
    assert torch.allclose(latent, tiny().encode_images(pixels)[0], atol=1e-5)


def test_changing_one_image_recomputes_exactly_one(tmp_path, monkeypatch):
    cfg = setup(tmp_path, monkeypatch, [ds("a"), ds("b", resolution=128)])
    build_caches(cfg, tiny(), progress=False)
    Image.new("RGB", (96, 96), (1, 2, 3)).save(tmp_path / "data/demo_002.png")
    again = by_id(build_caches(cfg, tiny(), progress=False))
    assert [(again[i]["latents_cached"], again[i]["latents_reused"]) for i in "ab"] == [(1, 5), (1, 5)]


def test_changing_crop_or_resolution_invalidates_only_that_dataset(tmp_path, monkeypatch):
    datasets = [ds("a", crop=True, crop_style="center"), ds("b")]
    cfg = setup(tmp_path, monkeypatch, datasets)
    build_caches(cfg, tiny(), progress=False)
    datasets[0]["crop_style"] = "corner"
    (tmp_path / "mdb.json").write_text(json.dumps(datasets))
    summary = by_id(build_caches(cfg, tiny(), progress=False))
    assert (summary["a"]["latents_cached"], summary["b"]["latents_reused"]) == (6, 6)
    datasets[1]["resolution"] = 128
    (tmp_path / "mdb.json").write_text(json.dumps(datasets))
    summary = by_id(build_caches(cfg, tiny(), progress=False))
    assert (summary["a"]["latents_reused"], summary["b"]["latents_cached"]) == (6, 6)
    assert summary["b"]["buckets"] == {"128x128": 6}


def test_latents_are_batched_by_vae_batch_size_within_one_size(tmp_path, monkeypatch):
    cfg = setup(tmp_path, monkeypatch, [ds("a", resolution=128)], n=7, size=(96, 96), vae_batch_size=3)
    Image.new("RGB", (192, 96), (9, 9, 9)).save(tmp_path / "data/wide.png")
    (tmp_path / "data/wide.txt").write_text("a wide grey image")
    model = Recorder(tiny())
    summary = build_caches(cfg, model, progress=False)
    # aspect 2 at 128 px area: 128*1.414 = 181 -> 192 wide, 128/1.414 = 90.5 -> 64 high
    assert by_id(summary)["a"]["buckets"] == {"128x128": 7, "192x64": 1}
    # 7 same-size images in batches of 3 (3, 3, 1); the wide one alone: batches never mix sizes
    assert sorted(model.image_batches) == sorted([(3, 3, 128, 128)] * 2 + [(1, 3, 128, 128), (1, 3, 64, 192)])
    assert model.prompt_batches == [4, 4, 1]  # 9 captions incl. "" in write_batch_size 4


def test_undecodable_image_is_skipped_not_cached_and_never_crashes(tmp_path, monkeypatch):
    cfg = setup(tmp_path, monkeypatch, [ds("a")], n=4)
    Image.effect_noise((96, 96), 50).convert("RGB").save(tmp_path / "data/broken.jpg", quality=90)
    data = (tmp_path / "data/broken.jpg").read_bytes()
    (tmp_path / "data/broken.jpg").write_bytes(data[: len(data) // 2])  # header fine, pixels cut off
    (tmp_path / "data/broken.txt").write_text("broken")
    for _ in range(2):
        a = by_id(build_caches(cfg, tiny(), progress=False))["a"]
        assert (a["images_found"], a["images_used"]) == (5, 4)
        assert a["skipped"][0]["path"].endswith("broken.jpg") and "cannot decode" in a["skipped"][0]["reason"]


def test_damaged_cache_entry_is_recomputed(tmp_path, monkeypatch):
    cfg = setup(tmp_path, monkeypatch, [ds("a")], n=3)
    cached = prepare_caches(cfg, tiny(), progress=False)
    cached.datasets[0].items[0].latent_path.write_bytes(b"garbage")
    assert by_id(build_caches(cfg, tiny(), progress=False))["a"]["latents_cached"] == 1


def test_too_small_dataset_fails_before_encoding(tmp_path, monkeypatch):
    cfg = setup(tmp_path, monkeypatch, [ds("small")], n=3, train_batch_size=2, gradient_accumulation_steps=2)
    with pytest.raises(
        DatasetError, match=r"'small' is too small: 3 images .* give 2 usable samples.*needs 4"
    ):
        build_caches(cfg, tiny(), progress=False)
    assert not (tmp_path / "cache").exists()
    (tmp_path / "mdb.json").write_text(json.dumps([ds("small", repeats=1)]))
    assert by_id(build_caches(cfg, tiny(), progress=False))["small"]["images_used"] == 3


def _reference_setup(tmp_path, family):
    """The reference multidatabackend file as users have it, with data folders made in tmp and every
    resolution divided by 8 so the tiny model runs fast (512 -> 64, 1024 -> 128)."""
    entries = load_json(REFS / family / "multidatabackend.json")
    for entry in entries:
        for key in ("resolution", "minimum_image_size", "maximum_image_size", "target_downsample_size"):
            if key in entry:
                entry[key] = int(entry[key]) // 8
    (tmp_path / "config").mkdir()
    (tmp_path / "config/multidatabackend.json").write_text(json.dumps(entries))
    camera = make_demo_dataset(tmp_path / "datasets/pseudo-camera-10k", n=4, size=(160, 128))
    for png in camera.glob("*.png"):  # filename captions, as the reference dataset has
        png.rename(
            camera / (png.with_suffix(".txt").read_text().strip().replace(" ", "_") + f"_{png.stem}.png")
        )
    make_demo_dataset(tmp_path / "datasets/dreambooth-subject", n=3, size=(128, 128), seed=1)
    Image.new("RGB", (40, 40)).save(tmp_path / "datasets/dreambooth-subject/tiny.png")  # below minimum
    return entries


@pytest.mark.parametrize("family", ["flux", "hidream"])
def test_reference_multidatabackend_shapes_cache_end_to_end(tmp_path, monkeypatch, family):
    monkeypatch.chdir(tmp_path)
    entries = _reference_setup(tmp_path, family)
    model_family = family if family in FAMILIES else "flux"  # the data file's shape is what is tested
    (tmp_path / "config/config.json").write_text(json.dumps({
        "model_family": model_family, "model_flavour": "tiny", "data_backend_config": "multidatabackend.json",
        "train_batch_size": 1, "vae_batch_size": "2", "seed": 42, "resolution_type": "pixel_area",
    }))  # fmt: skip
    cfg = load_config(tmp_path / "config/config.json")
    model = tiny(model_family)
    summary = by_id(build_caches(cfg, model, progress=False))
    assert list(summary) == [e["id"] for e in entries if e.get("dataset_type") != "text_embeds"]
    camera = summary[f"pseudo-camera-10k-{family}"]
    assert (
        camera["buckets"] == {"64x64" if family == "flux" else "128x128": 4} and camera["latents_cached"] == 4
    )
    subject = summary["dreambooth-subject"]
    assert subject["images_used"] == 3 and subject["buckets"] == {"128x128": 3}
    assert "below minimum_image_size 128" in subject["skipped"][0]["reason"]
    assert (tmp_path / f"cache/vae/{family}/dreambooth-subject").is_dir()
    text_files = list((tmp_path / f"cache/text/{family}").glob("*.safetensors"))
    assert len(text_files) == 4 + 1 + 1  # 4 filename captions, the instance prompt, ""
    rerun = by_id(build_caches(cfg, model, progress=False))
    assert all(d["latents_cached"] == 0 and d["latents_reused"] == d["images_used"] for d in rerun.values())
    Image.new("RGB", (128, 128), (7, 7, 7)).save(tmp_path / "datasets/dreambooth-subject/demo_001.png")
    changed = by_id(build_caches(cfg, model, progress=False))
    # the subject folder feeds one (HiDream) or two (Flux 1024 + 512) datasets: one latent each
    for name, d in changed.items():
        assert d["latents_cached"] == (1 if name.startswith("dreambooth") else 0)
