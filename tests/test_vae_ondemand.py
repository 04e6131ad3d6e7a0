"""SimpleTuner's `vae_cache_ondemand` (trainer/cache/ondemand.py): no latent is encoded at startup;
a batch's latents are encoded when it is drawn and written to the VAE cache for later visits; the
VAE stays loaded; the text-embed cache works as before; resume stays bit-exact. `vae_cache_disable`:
the same, encoded on every draw and never written."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tunegraph.trainer.cli import main
from tunegraph.trainer.commands.demo import write_demo_config
from tunegraph.trainer.config import TrainConfig, load_config
from tunegraph.trainer.config_notes import key_groups
from tunegraph.trainer.models import get_family
from tunegraph.trainer.plan.advice import cheapest_fit
from tunegraph.trainer.plan.check import plan_for
from tunegraph.trainer.training.loop import train

TINY = {"validation_prompt": None, "eval_steps_interval": None, "checkpoint_step_interval": None}
README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """4 of the demo's images plus one truncated JPEG that only decoding finds (verify() passes)."""
    config = write_demo_config(tmp_path_factory.mktemp("ondemand"), steps=4)
    data = config.parent.parent / "data"
    for path in sorted(data.glob("demo_00[4-7].*")):  # a VAE call takes ~0.4 s on CPU: keep them few
        path.unlink()
    buf = io.BytesIO()
    Image.effect_noise((96, 96), 50).convert("RGB").save(buf, "JPEG", quality=90)
    (data / "broken.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])  # pixels cut off
    (data / "broken.txt").write_text("a broken image\n")
    return config


def run_config(demo: Path, where: Path, *, entry: dict | None = None, **overrides) -> TrainConfig:
    """The demo config with its own VAE and text caches under `where` (entry: dataset key changes)."""
    backends = json.loads((demo.parent / "multidatabackend.json").read_text())
    backends[0].update(cache_dir_vae=str(where / "vae"), **(entry or {}))
    backends[1]["cache_dir"] = str(where / "text")
    where.mkdir(parents=True, exist_ok=True)
    (where / "multidatabackend.json").write_text(json.dumps(backends))
    keys = {
        **TINY,
        "output_dir": str(where / "out"),
        "data_backend_config": str(where / "multidatabackend.json"),
    }
    return load_config(demo, {**keys, **overrides})


def latents(where: Path) -> dict[str, torch.Tensor]:
    return {p.name: load_file(str(p))["latents"] for p in sorted((where / "vae").glob("*.safetensors"))}


def losses(where: Path) -> list[float]:
    rows = [json.loads(x) for x in (where / "out" / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_cache_command_skips_latents_and_caches_text(demo: Path, tmp_path: Path, capsys, caplog) -> None:
    """`tunegraph cache` with the option on: as SimpleTuner, no VAE cache pass; text embeds cached."""
    run_config(demo, tmp_path)  # writes tmp_path/multidatabackend.json
    config = tmp_path / "config.json"
    keys = {"data_backend_config": str(tmp_path / "multidatabackend.json"), "vae_cache_ondemand": True}
    keys["lycoris_config"] = str(demo.parent / "lycoris_config.json")
    config.write_text(json.dumps({**json.loads(demo.read_text()), **keys}))
    with caplog.at_level(logging.INFO, logger="tunegraph"):
        assert main(["cache", "--config", str(config), "--json"]) == 0
    (report,) = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["datasets"]
    assert (report["latents_cached"], report["latents_on_demand"], report["images_used"]) == (0, 4, 4)
    assert not list(tmp_path.glob("vae/*"))
    assert len(list((tmp_path / "text").glob("*.safetensors"))) == 5  # 4 captions + "" for dropout
    said = "vae_cache_ondemand: no latents are encoded now; 4 will be encoded when a batch first draws them"
    assert any(said in r.getMessage() for r in caplog.records)


class Stop(Exception):
    pass


def _stop_at_1(step, total, record):
    if step == 1:
        raise Stop


def counted_train(cfg: TrainConfig) -> tuple[dict, list[int], list[str]]:
    """Train; also the images per VAE call and the log lines."""
    calls: list[int] = []
    family = get_family("flux")
    encode = family.encode_images
    with _capture() as records, pytest.MonkeyPatch.context() as mp:
        mp.setattr(
            family, "encode_images", lambda self, pixels: calls.append(len(pixels)) or encode(self, pixels)
        )
        summary = train(cfg, progress=False)
    return summary, calls, [r.getMessage() for r in records]


@pytest.fixture(scope="module")
def runs(demo: Path, tmp_path_factory) -> dict:
    """4 steps of 2 images (two epochs) cached at startup, the same with config.json's key (VAE calls
    counted), with vae_cache_disable, and with the dataset entry's key (SimpleTuner v4.6+) stopped at step 1 then resumed."""
    root = tmp_path_factory.mktemp("runs")
    out: dict = {"root": root}
    out["cached"] = train(run_config(demo, root / "cached", vae_batch_size=1), progress=False)
    for name, key in (("on", "vae_cache_ondemand"), ("off", "vae_cache_disable")):
        out[name], out[f"{name}_calls"], out[f"{name}_log"] = counted_train(
            run_config(demo, root / name, **{key: True})
        )
    entry = {"vae_cache_ondemand": True}
    with pytest.raises(Stop):
        cfg = run_config(demo, root / "cut", entry=entry)
        train(cfg, on_step=_stop_at_1, interrupt_types=(Stop,), progress=False)
    out["at_stop"] = latents(root / "cut")
    resume = run_config(demo, root / "cut", entry=entry, resume_from_checkpoint="latest")
    out["resumed"] = train(resume, progress=False)
    return out


class _capture(logging.Handler):
    def __enter__(self) -> list[logging.LogRecord]:
        self.records: list[logging.LogRecord] = []
        self.logger = logging.getLogger("tunegraph")
        self.level = self.logger.level
        self.logger.addHandler(self)
        self.logger.setLevel(logging.INFO)
        return self.records

    def __exit__(self, *exc) -> None:
        self.logger.removeHandler(self)
        self.logger.setLevel(self.level)

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_ondemand_trains_on_the_latents_the_cache_holds(runs: dict) -> None:
    root = runs["root"]
    # corrupt images are skipped and counted exactly as the startup cache skips them
    (on,), (cached,) = runs["on"]["cache"]["datasets"], runs["cached"]["cache"]["datasets"]
    assert on["skipped"] == cached["skipped"] and len(on["skipped"]) == 1
    assert "cannot decode image" in on["skipped"][0]["reason"]
    assert (on["latents_cached"], on["latents_on_demand"], cached["latents_cached"]) == (0, 4, 4)
    # each image was encoded once, alone, when first drawn, and written under the cache's own key;
    # the second epoch read them
    assert runs["on_calls"] == [1, 1, 1, 1]
    written, full = latents(root / "on"), latents(root / "cached")
    assert written.keys() == full.keys() and len(full) == 4
    # on demand each image has a VAE call of its own, as the startup cache with vae_batch_size 1:
    # the same bits (a batched call rounds differently, ~7e-7), so the same losses
    for name, tensor in written.items():
        assert torch.equal(tensor, full[name]), name
    assert losses(root / "on") == losses(root / "cached")
    assert any("VAE kept on the device" in m for m in runs["on_log"])


def test_cache_disable_encodes_every_draw_and_writes_nothing(runs: dict) -> None:
    root = runs["root"]
    (off,) = runs["off"]["cache"]["datasets"]
    assert (off["latents_cached"], off["latents_on_demand"], len(off["skipped"])) == (0, 4, 1)
    assert runs["off_calls"] == [1] * 8  # 4 steps of 2 images: each draw encoded again, alone
    assert not list((root / "off").glob("vae/*.safetensors"))
    assert losses(root / "off") == losses(root / "cached")  # the mode, as the cache holds it
    assert any("vae_cache_disable: no latents are encoded now or written" in m for m in runs["off_log"])


def test_dataset_key_alone_and_resume_bit_exact(runs: dict) -> None:
    """Stopped at step 1 only the images drawn so far had latents; the resumed run read those and
    encoded the rest when drawn, and ends bit-exact with the uninterrupted run."""
    root = runs["root"]
    assert len(runs["at_stop"]) == 2  # one step of 2 images: on demand, not at startup
    assert runs["resumed"]["resumed_from"].endswith("checkpoint-1")
    assert runs["resumed"]["cache"]["datasets"][0]["latents_on_demand"] == 2
    assert latents(root / "cut").keys() == latents(root / "on").keys()
    a = load_file(str(root / "on" / "out" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(root / "cut" / "out" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert losses(root / "cut") == losses(root / "on")


def test_memory_plan_counts_the_vae_during_training(demo: Path, tmp_path: Path) -> None:
    off = plan_for(run_config(demo, tmp_path), "cpu")
    on_cfg = run_config(demo, tmp_path, entry={"vae_cache_ondemand": True})
    on = plan_for(on_cfg, "cpu")
    step = {p.name: p for p in on.phases}
    vae = on.inputs.vae_params * on.inputs.dtype_bytes
    assert step["training step"].device - {p.name: p for p in off.phases}["training step"].device == vae
    encode = step["on-demand VAE encode"]
    parts = {p.name: p.device for p in encode.parts}
    assert parts["VAE (kept on the device)"] == vae and "activations" not in parts
    w, h = on.inputs.bucket_px  # one image per VAE call, float32: three full-resolution feature maps
    assert parts["VAE encode working memory (estimate)"] == 3 * w * h * on.inputs.vae_channels * 4
    assert "on-demand VAE encode" not in {p.name for p in off.phases}
    # too small a card: the first change the plan proposes is to cache at startup instead
    (first, *_) = cheapest_fit(on.inputs, on_cfg, on.peak.device - 1, "cpu")
    assert first.keys == {"vae_cache_ondemand": False, "vae_cache_disable": False, "keep_vae_loaded": False}
    after = {p.name: p.device for p in first.plan.phases}
    assert (
        "on-demand VAE encode" not in after and after["training step"] == step["training step"].device - vae
    )


@pytest.mark.parametrize("key", ["vae_cache_ondemand", "vae_cache_disable"])
def test_option_is_implemented_not_warned(key: str) -> None:
    assert not TrainConfig.from_dict({key: True}, source="config.json").warnings
    assert key not in key_groups()["not_implemented"]
    readme = README.read_text(encoding="utf-8")
    not_acted = readme[readme.index("#### SimpleTuner keys TuneGraph does not act on") :]
    not_implemented = not_acted[not_acted.index("- Not implemented") : not_acted.index("- No effect")]
    assert key not in not_implemented
    assert "`vae_cache_ondemand`" in not_acted[not_acted.index("- Implemented since issue 15") :]
