"""disable_bucket_pruning: a bucket smaller than one batch is kept and its batch filled with its own
images again (SimpleTuner's sampler fills from the bucket's seen images); by default it is dropped."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from PIL import Image

from tunegraph.trainer.cache.build import prepare_caches
from tunegraph.trainer.config import TrainConfig
from tunegraph.trainer.data.demo import make_demo_dataset
from tunegraph.trainer.data.sampler import TrainingData
from tunegraph.trainer.data.sizing import check_dataset_size
from tunegraph.trainer.errors import DatasetError
from tunegraph.trainer.models import load_model


def test_small_bucket_is_kept_and_filled(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_demo_dataset(tmp_path / "d", n=4, size=(64, 64))
    Image.new("RGB", (128, 64), (3, 3, 3)).save(tmp_path / "d" / "w.png")  # alone in its 2:1 bucket
    (tmp_path / "d" / "w.txt").write_text("a wide grey image")
    entry = {"id": "d", "instance_data_dir": "d", "caption_strategy": "textfile", "resolution": 128}
    (tmp_path / "mdb.json").write_text(json.dumps([entry]))
    values = {"model_flavour": "tiny", "data_backend_config": "mdb.json", "train_batch_size": 3, "seed": 1}
    pruned = TrainConfig.from_dict(values)
    kept = TrainConfig.from_dict({**values, "disable_bucket_pruning": True})
    cached = prepare_caches(pruned, load_model(pruned), progress=False)
    wide = next(i for i, item in enumerate(cached.datasets[0].items) if item.bucket != "128x128")
    default = TrainingData.from_config(pruned, cached)
    filled = TrainingData.from_config(kept, cached)
    assert len(default) == 1 and len(filled) == 2  # 4 square -> 1 batch of 3 (+1 left over); wide: 0 or 1
    assert all((0, wide) not in batch for batch in default.epoch_plan(0))
    (wide_batch,) = [b for b in filled.epoch_plan(0) if (0, wide) in b]
    assert Counter(wide_batch) == {(0, wide): 3}


def test_size_check_counts_filled_buckets() -> None:
    with pytest.raises(DatasetError, match="too small"):
        check_dataset_size("d", {"64x64": 1, "128x64": 1}, 0, 2, 1, "m.json")
    check_dataset_size("d", {"64x64": 1, "128x64": 1}, 0, 2, 1, "m.json", keep_small=True)
