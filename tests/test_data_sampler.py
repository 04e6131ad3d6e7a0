"""TrainingData: steps per epoch, repeats, buckets, mixing, caption dropout, determinism and resume."""

import json
from collections import Counter

import pytest
import torch
from PIL import Image

from tunegraph.trainer.cache.build import build_training_data, prepare_caches
from tunegraph.trainer.config import TrainConfig
from tunegraph.trainer.data.demo import make_demo_dataset
from tunegraph.trainer.data.sampler import TrainingData
from tunegraph.trainer.errors import TrainingError
from tunegraph.trainer.models import load_model


@pytest.fixture(scope="module")
def model():
    return load_model(TrainConfig.from_dict({"model_family": "flux", "model_flavour": "tiny"}))


def build(tmp_path, monkeypatch, model, datasets, **cfg):
    """Two folders: `sq` (5 square images) and `wide` (2 square + 1 wide image), cached."""
    monkeypatch.chdir(tmp_path)
    make_demo_dataset(tmp_path / "sq", n=5, size=(64, 64))
    make_demo_dataset(tmp_path / "wide", n=2, size=(64, 64), seed=1)
    Image.new("RGB", (128, 64), (3, 3, 3)).save(tmp_path / "wide/w.png")
    (tmp_path / "wide/w.txt").write_text("a wide grey image\na long grey picture")
    (tmp_path / "mdb.json").write_text(json.dumps(datasets))
    values = {"model_flavour": "tiny", "data_backend_config": "mdb.json", "train_batch_size": 2, "seed": 3}
    c = TrainConfig.from_dict({**values, **cfg})
    return c, prepare_caches(c, model, progress=False)


def ds(id, folder, **keys):
    return {"id": id, "instance_data_dir": folder, "caption_strategy": "textfile", "resolution": 64, **keys}


def refs(data, epoch):
    return [ref for batch in data.epoch_plan(epoch) for ref in batch]


def test_steps_per_epoch_follow_repeats_and_drop_partial_bucket_batches(tmp_path, monkeypatch, model):
    # sq: 5 images x (repeats 1 + 1) = 10 samples -> 5 batches of 2
    # wide at 128 px: 2 square images -> 128x128, 1 batch; the 2:1 image -> 192x64 alone, no batch
    cfg, cached = build(
        tmp_path, monkeypatch, model, [ds("sq", "sq", repeats=1), ds("wide", "wide", resolution=128)]
    )
    assert [d.id for d in (c.spec for c in cached.datasets)] == ["sq", "wide"]
    assert Counter(i.bucket for i in cached.datasets[1].items) == {"128x128": 2, "192x64": 1}
    data = TrainingData.from_config(cfg, cached)
    assert len(data) == 5 + 1  # the lone 192x64 sample cannot fill a batch of 2
    counts = Counter(refs(data, 0))
    assert all(counts[(0, i)] == 2 for i in range(5))  # each image repeats + 1 times
    assert counts[(1, 2)] == 0 and counts[(1, 0)] == counts[(1, 1)] == 1
    for batch in data.epoch_plan(0):  # one bucket per batch
        assert len({cached.datasets[d].items[i].bucket for d, i in batch}) == 1


def test_batches_hold_latents_embeds_captions_and_ids(tmp_path, monkeypatch, model):
    cfg, cached = build(
        tmp_path, monkeypatch, model, [ds("sq", "sq", is_regularisation_data=True), ds("w", "wide")]
    )
    data = TrainingData.from_config(cfg, cached)
    batches = list(data)
    assert len(batches) == len(data) == 2 + 1 and data.position == 3
    for b in batches:
        assert b["latents"].shape == (2, 16, 8, 8) and len(b["captions"]) == 2
        assert (
            b["embeds"]["prompt_embeds"].shape[0] == 2 and b["embeds"]["pooled_prompt_embeds"].shape[0] == 2
        )
        assert b["is_regularisation_data"] == [d == "sq" for d in b["dataset_ids"]]
    assert Counter(i for b in batches for i in b["dataset_ids"]) == {"sq": 4, "w": 2}
    # embeds are the cached encodings of exactly these captions
    b = batches[0]
    direct = model.encode_prompts(b["captions"])
    assert torch.allclose(b["embeds"]["prompt_embeds"], direct["prompt_embeds"], atol=1e-6)


def test_same_seed_same_batches_and_epochs_differ(tmp_path, monkeypatch, model):
    cfg, cached = build(tmp_path, monkeypatch, model, [ds("sq", "sq", repeats=3)])
    a, b = TrainingData.from_config(cfg, cached), TrainingData.from_config(cfg, cached)
    first = [x["captions"] for x in a]
    assert first == [x["captions"] for x in b]
    assert a.epoch_plan(0) != a.epoch_plan(1)  # 20 samples: reshuffled every epoch
    other = TrainingData(cached, batch_size=2, seed=4)
    assert other.epoch_plan(0) != a.epoch_plan(0)


def test_resume_continues_with_the_batches_an_uninterrupted_run_sees(tmp_path, monkeypatch, model):
    cfg, cached = build(tmp_path, monkeypatch, model, [ds("sq", "sq", repeats=1), ds("w", "wide")])
    straight = TrainingData.from_config(cfg, cached)
    steps = len(straight)  # 5 + 1
    expected = [straight.next_batch() for _ in range(steps * 2 + 2)]  # crosses two epoch ends
    for stop in (3, steps, steps + 1):
        run = TrainingData.from_config(cfg, cached)
        for _ in range(stop):
            run.next_batch()
        state = json.loads(json.dumps(run.state_dict()))  # as a checkpoint stores it
        resumed = TrainingData.from_config(cfg, cached)
        resumed.load_state_dict(state)
        for want in expected[stop:]:
            got = resumed.next_batch()
            assert got["captions"] == want["captions"] and torch.equal(got["latents"], want["latents"])
    assert straight.state_dict() == {"epoch": 2, "position": 2, "seed": 3, "steps_per_epoch": steps}


def test_resume_rejects_a_foreign_state(tmp_path, monkeypatch, model):
    cfg, cached = build(tmp_path, monkeypatch, model, [ds("sq", "sq")])
    data = TrainingData.from_config(cfg, cached)
    with pytest.raises(TrainingError, match="position 99"):
        data.load_state_dict({"epoch": 0, "position": 99, "seed": 3})
    with pytest.raises(TrainingError, match="seed 5"):
        data.load_state_dict({"epoch": 0, "position": 0, "seed": 5})


def test_probability_weights_the_mix_and_zero_leaves_a_dataset_out(tmp_path, monkeypatch, model):
    heavy = [ds("sq", "sq", repeats=3, probability=1e6), ds("w", "wide", repeats=3, probability=1)]
    cfg, cached = build(tmp_path, monkeypatch, model, heavy)
    order = [batch[0][0] for batch in TrainingData.from_config(cfg, cached).epoch_plan(0)]
    # sq: 5 x 4 = 20 samples -> 10 batches; wide at 64 px: all 3 images in 64x64 (64*1.414 = 90.5 -> 64),
    # 3 x 4 = 12 -> 6 batches. Every heavy batch comes first (a 1e-6 chance per step otherwise).
    assert order == [0] * 10 + [1] * 6
    off = [ds("sq", "sq"), ds("w", "wide", probability=0)]
    cfg, cached = build(tmp_path, monkeypatch, model, off)
    assert {d for batch in TrainingData.from_config(cfg, cached).epoch_plan(0) for d, _ in batch} == {0}


def test_caption_dropout_trains_on_the_empty_caption(tmp_path, monkeypatch, model):
    cfg, cached = build(tmp_path, monkeypatch, model, [ds("sq", "sq")], caption_dropout_probability=1.0)
    batch = TrainingData.from_config(cfg, cached).next_batch()
    assert batch["captions"] == ["", ""]
    empty = model.encode_prompts([""])["prompt_embeds"][0]
    assert torch.allclose(batch["embeds"]["prompt_embeds"][1], empty, atol=1e-6)


def test_multi_line_captions_are_all_cached_and_drawn(tmp_path, monkeypatch, model):
    cfg, cached = build(tmp_path, monkeypatch, model, [ds("w", "wide", repeats=40)])
    assert {"a wide grey image", "a long grey picture"} <= set(cached.text_paths)
    data = TrainingData(cached, batch_size=1, seed=0)
    wide = {c for b in data for c in b["captions"] if "grey" in c}
    assert wide == {"a wide grey image", "a long grey picture"}


def test_build_training_data_gives_the_sampler_and_the_subject_prompt(tmp_path, monkeypatch, model):
    datasets = [ds("reg", "sq", is_regularisation_data=True, caption_strategy="instanceprompt", instance_prompt="a photo"),
                ds("subject", "wide", caption_strategy="instanceprompt", instance_prompt="sks dog")]  # fmt: skip
    cfg, _ = build(tmp_path, monkeypatch, model, datasets)
    data = build_training_data(cfg, model, progress=False)
    assert data.instance_prompt == "sks dog"  # the training subject's, not the regularisation set's
    assert [d["latents_reused"] for d in data.cached.summary["datasets"]] == [5, 3]
    assert set(data.next_batch()["captions"]) <= {"a photo", "sks dog"}
