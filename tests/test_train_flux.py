"""Headless Flux training on the tiny flavour: numbers that would break if the trainer broke."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tunegraph.trainer.commands.demo import write_demo_config
from tunegraph.trainer.config import load_config
from tunegraph.trainer.errors import TrainingError
from tunegraph.trainer.models import load_model
from tunegraph.trainer.training.loop import train

TINY = {"validation_prompt": None, "eval_steps_interval": None, "checkpoint_step_interval": None}


@pytest.fixture(scope="module")
def demo_config(tmp_path_factory) -> Path:
    """The demo's generated dataset and config files (caches shared by every run here)."""
    return write_demo_config(tmp_path_factory.mktemp("demo"), steps=8)


def config(demo_config: Path, out: Path, **overrides):
    return load_config(demo_config, {**TINY, "output_dir": str(out), **overrides})


def adapter_tensors(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "pytorch_lora_weights.safetensors"))


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_eval_loss_falls_and_base_is_untouched(demo_config: Path, tmp_path: Path) -> None:
    lyco = json.loads((demo_config.parent / "lycoris_config.json").read_text())
    lyco["apply_preset"]["target_module"] = ["Attention", "FeedForward"]
    (tmp_path / "lyco.json").write_text(json.dumps(lyco))
    steps = 60
    cfg = config(
        demo_config,
        tmp_path,
        max_train_steps=steps,
        eval_steps_interval=10,
        lycoris_config=str(tmp_path / "lyco.json"),
    )
    model = load_model(cfg)
    base = {k: v.clone() for k, v in model.transformer.state_dict().items()}
    summary = train(cfg, model=model, progress=False)
    assert summary["eval_loss_last"] < 0.9 * summary["eval_loss_first"], summary
    # the adapter sits beside the base: the base tensors themselves never change
    after = model.transformer.state_dict()
    changed = [k for k in base if k in after and not torch.equal(base[k], after[k])]
    assert not changed, changed[:5]
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "loss" in x]
    assert [x["step"] for x in steps] == list(range(1, 61))
    assert {"loss", "lr", "grad_norm", "seconds"} <= steps[0].keys()
    assert sum("eval_loss" in x for x in lines) == 7  # step 0 and every 10 steps
    assert (tmp_path / "loss.png").stat().st_size > 10_000


def test_same_seed_same_adapter(demo_config: Path, tmp_path: Path) -> None:
    train(config(demo_config, tmp_path / "a", max_train_steps=3), progress=False)
    train(config(demo_config, tmp_path / "b", max_train_steps=3), progress=False)
    train(config(demo_config, tmp_path / "c", max_train_steps=3, seed=7), progress=False)
    a, b, c = (adapter_tensors(tmp_path / x) for x in "abc")
    assert_same(a, b)
    assert any(not torch.equal(a[k], c[k]) for k in a)


class Stop(Exception):
    pass


def test_bit_exact_resume_after_interrupt(demo_config: Path, tmp_path: Path) -> None:
    """Stopped (Cancel) at step 5 and resumed to 8 == uninterrupted to 8, with EMA and warmup."""
    extra = dict(max_train_steps=8, use_ema=True, lr_scheduler="cosine", lr_warmup_steps=2)
    train(config(demo_config, tmp_path / "full", **extra), progress=False)

    def stop_at_5(step, total, record):
        if step == 5:
            raise Stop

    with pytest.raises(Stop):
        train(
            config(demo_config, tmp_path / "cut", **extra),
            on_step=stop_at_5,
            interrupt_types=(Stop,),
            progress=False,
        )
    assert (tmp_path / "cut" / "checkpoint-5" / "complete").exists()
    summary = train(
        config(demo_config, tmp_path / "cut", resume_from_checkpoint="latest", **extra), progress=False
    )
    assert summary["resumed_from"].endswith("checkpoint-5")
    assert_same(adapter_tensors(tmp_path / "full"), adapter_tensors(tmp_path / "cut"))
    assert_same(
        load_file(str(tmp_path / "full" / "ema" / "pytorch_lora_weights.safetensors")),
        load_file(str(tmp_path / "cut" / "ema" / "pytorch_lora_weights.safetensors")),
    )
    steps = [json.loads(x)["step"] for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))  # the resumed run continues the metrics file, no duplicates


def test_resume_after_kill_during_training(demo_config: Path, tmp_path: Path) -> None:
    """SIGKILL a CLI run at an arbitrary moment after its first checkpoint (often mid-write of the
    next); `latest` must resume from a whole checkpoint and still end bit-exact."""
    extra = dict(max_train_steps=12, checkpoint_step_interval=2, gradient_accumulation_steps=2)
    train(config(demo_config, tmp_path / "full", **extra), progress=False)
    out = tmp_path / "killed"
    sets = [
        f"{k}={v}"
        for k, v in {**extra, "output_dir": out, "validation_prompt": "", "eval_steps_interval": ""}.items()
    ]
    cmd = [sys.executable, "-m", "tunegraph.trainer.cli", "train", "--config", str(demo_config)]
    proc = subprocess.Popen(cmd + [a for s in sets for a in ("--set", s)], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (out / "checkpoint-4" / "complete").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "pytorch_lora_weights.safetensors").exists(), "killed too late to test anything"
    summary = train(config(demo_config, out, resume_from_checkpoint="latest", **extra), progress=False)
    assert summary["resumed_from"] is not None
    assert_same(adapter_tensors(tmp_path / "full"), adapter_tensors(out))


def test_exported_file_reproduces_trained_model(demo_config: Path, tmp_path: Path) -> None:
    from tunegraph.trainer.adapters import load_adapter_file

    cfg = config(demo_config, tmp_path, max_train_steps=3)
    model = load_model(cfg)
    train(cfg, model=model, progress=False)
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    embeds = model.encode_prompts(["a red circle"])
    args = (x, torch.tensor([0.6]), embeds, torch.tensor([1.0]))
    with torch.no_grad():
        trained = model.predict(*args)
    fresh = load_model(cfg)
    with torch.no_grad():
        base = fresh.predict(*args)
    load_adapter_file(tmp_path / "pytorch_lora_weights.safetensors", fresh.transformer)
    with torch.no_grad():
        reloaded = fresh.predict(*args)
    assert (trained - base).abs().max() > 1e-4  # the adapter does something
    torch.testing.assert_close(reloaded, trained, rtol=1e-5, atol=1e-6)


def test_lora_trains_only_adapter(demo_config: Path, tmp_path: Path) -> None:
    cfg = config(
        demo_config, tmp_path, lora_type="standard", lora_rank=4, learning_rate=1e-3, max_train_steps=3
    )
    summary = train(cfg, progress=False)
    keys = adapter_tensors(tmp_path)
    assert keys and all(k.startswith("transformer.") and ".lora_" in k for k in keys)
    assert summary["steps"] == 3


def test_checkpoint_export_cli_matches_state(demo_config: Path, tmp_path: Path) -> None:
    cfg = config(demo_config, tmp_path, max_train_steps=4, checkpoint_step_interval=2)
    train(cfg, progress=False)
    out = tmp_path / "exported.safetensors"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tunegraph.trainer.cli",
            "export",
            "--checkpoint",
            str(tmp_path / "checkpoint-2"),
            "--out",
            str(out),
            "--json",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(proc.stdout.strip().splitlines()[-1])["adapter"] == str(out)
    exported, final = load_file(str(out)), adapter_tensors(tmp_path)
    assert exported.keys() == final.keys()
    assert any(not torch.equal(exported[k], final[k]) for k in final)  # step 2 differs from step 4


def test_validation_images_and_real_cfg(demo_config: Path, tmp_path: Path) -> None:
    from tunegraph.trainer.training.sampling import sample_images

    cfg = config(
        demo_config,
        tmp_path,
        max_train_steps=2,
        validation_prompt="a <token> circle",
        instance_prompt="red",
        validation_resolution="64x64,96x64",
        validation_num_inference_steps=3,
        validation_guidance_real=2.0,
    )
    summary = train(cfg, progress=False)
    names = sorted(Path(p).name for p in summary["validation_images"])
    assert names == ["validation-64x64.png", "validation-96x64.png"]
    assert (tmp_path / "validation" / "step-000002" / "validation-96x64.png").exists()
    model = load_model(cfg)
    images, cfg_steps = sample_images(
        model,
        ["x"],
        "blurry",
        width=96,
        height=64,
        steps=5,
        guidance=1.0,
        seed=1,
        guidance_real=3.0,
        no_cfg_steps=2,
    )
    assert images[0].size == (96, 64) and cfg_steps == 3
    # validation_adaptive_cfg_threshold: CFG switches off once cond and uncond agree (AdaptiveGuider's rule)
    _, adaptive_steps = sample_images(
        model,
        ["x"],
        "blurry",
        width=96,
        height=64,
        steps=5,
        guidance=1.0,
        seed=1,
        guidance_real=3.0,
        no_cfg_steps=2,
        cfg_threshold=0.0,
    )
    assert 1 <= adaptive_steps < cfg_steps


def test_sampler_matches_flux_pipeline(demo_config: Path) -> None:
    """Without real CFG our sampler is FluxPipeline, step for step."""
    import numpy as np

    from tunegraph.trainer.training.sampling import sample_images

    model = load_model(config(demo_config, Path("/tmp/unused")))
    ours, _ = sample_images(model, ["a blue square"], width=64, height=64, steps=4, guidance=3.5, seed=3)
    pipe = model.validation_pipeline()
    theirs = pipe(
        "a blue square",
        width=64,
        height=64,
        num_inference_steps=4,
        guidance_scale=3.5,
        generator=torch.Generator("cpu").manual_seed(3),
        max_sequence_length=model.max_sequence_length,
    ).images[0]
    diff = np.abs(np.asarray(ours[0], dtype=int) - np.asarray(theirs, dtype=int))
    assert diff.max() <= 1, diff.max()


def test_nan_loss_stops_and_keeps_checkpoint(demo_config: Path, tmp_path: Path) -> None:
    cfg = config(
        demo_config,
        tmp_path,
        max_train_steps=30,
        checkpoint_step_interval=1,
        checkpoints_total_limit=2,
        learning_rate=1e30,
        max_grad_norm=0,
        optimizer="adamw",
    )
    with pytest.raises(TrainingError, match="loss became nan|loss became inf"):
        train(cfg, progress=False)
    ckpts = sorted(tmp_path.glob("checkpoint-*"))
    assert ckpts and all((c / "complete").exists() for c in ckpts)
    assert not (tmp_path / "pytorch_lora_weights.safetensors").exists()


def test_bad_output_dir_and_resume_path(demo_config: Path, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(TrainingError, match="cannot be written"):
        train(config(demo_config, tmp_path / "file" / "out"), progress=False)
    with pytest.raises(TrainingError, match="checkpoint-99"):
        train(
            config(demo_config, tmp_path / "o", resume_from_checkpoint=str(tmp_path / "checkpoint-99")),
            progress=False,
        )


def test_cli_train_json_summary(demo_config: Path, tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tunegraph.trainer.cli",
            "train",
            "--config",
            str(demo_config),
            "--json",
            "--set",
            f"output_dir={tmp_path}",
            "--set",
            "max_train_steps=2",
            "--set",
            "validation_prompt=",
            "--set",
            "eval_steps_interval=",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 2 and Path(summary["adapter"]).exists()
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "tunegraph.trainer.cli",
            "train",
            "--config",
            str(demo_config),
            "--json",
            "--set",
            "learning_rat=1",
        ],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "did you mean 'learning_rate'" in bad.stderr
    assert "error" in json.loads(bad.stdout.strip().splitlines()[-1])
