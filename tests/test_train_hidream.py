"""The reference HiDream config.json trains end to end from the CLI (tiny flavour, generated data)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tunegraph.trainer.adapters import read_adapter_metadata
from tunegraph.trainer.config import load_config
from tunegraph.trainer.data.demo import make_demo_dataset
from tunegraph.trainer.training.loop import train

REF = Path(__file__).parent / "data" / "reference-configs" / "hidream"


@pytest.fixture(scope="module")
def hidream_config(tmp_path_factory) -> Path:
    """The reference files as users have them; only paths and sizes point at tiny generated data."""
    root = tmp_path_factory.mktemp("hidream")
    data = make_demo_dataset(root / "datasets" / "subject", n=4)
    backends = json.loads((REF / "multidatabackend.json").read_text())
    for entry in backends:
        if entry.get("dataset_type") == "text_embeds":
            entry["cache_dir"] = str(root / "cache" / "text")
            continue
        entry.update(instance_data_dir=str(data), cache_dir_vae=str(root / "cache" / entry["id"]))
        entry.update(resolution=64, minimum_image_size=64, maximum_image_size=64, target_downsample_size=64)
        entry["repeats"] = min(entry.get("repeats", 0), 1)
    (root / "config").mkdir()
    (root / "config" / "multidatabackend.json").write_text(json.dumps(backends))
    shutil.copy(REF / "lycoris_config.name_algo_map.json", root / "config" / "lycoris_config.json")
    shutil.copy(
        REF / "config.json", root / "config" / "config.json"
    )  # trailing commas, string numbers: as is
    return root / "config" / "config.json"


def overrides(out: Path, **more) -> dict:
    return {
        "model_flavour": "tiny",
        "output_dir": str(out),
        "data_backend_config": "multidatabackend.json",
        "lycoris_config": "lycoris_config.json",
        "resume_from_checkpoint": "none",
        "max_train_steps": 6,
        "mixed_precision": "no",
        "validation_resolution": "64x64",
        "validation_num_inference_steps": 2,
        "validation_step_interval": 1000,
        "eval_steps_interval": 3,
        "num_eval_images": 2,
        "eval_timesteps": 4,
        "learning_rate": 1e-3,
        "report_to": "none",
        **more,
    }


def test_reference_config_trains_from_cli(hidream_config: Path, tmp_path: Path) -> None:
    args = [f"{k}={v}" for k, v in overrides(tmp_path, hidream_use_load_balancing_loss=True).items()]
    proc = subprocess.run(
        [sys.executable, "-m", "tunegraph.trainer.cli", "train", "--config", str(hidream_config), "--json"]
        + [a for s in args for a in ("--set", s)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    # the reference config's int8-quanto base (and text encoders 3, 4) is really used and recorded
    assert read_adapter_metadata(summary["adapter"])["base_precision"] == "int8-quanto"
    assert summary["steps"] == 6 and summary["eval_loss_last"] is not None
    keys = load_file(summary["adapter"]).keys()
    assert any("ff_i_shared_experts" in k for k in keys) and not any("ff_i_experts" in k for k in keys)
    assert Path(summary["validation_images"][0]).name == "validation-64x64.png"


def test_bit_exact_resume_hidream(hidream_config: Path, tmp_path: Path) -> None:
    class Stop(Exception):
        pass

    def stop_at_3(step, total, record):
        if step == 3:
            raise Stop

    extra = {"validation_prompt": None, "hidream_use_load_balancing_loss": True}
    train(load_config(hidream_config, overrides(tmp_path / "full", **extra)), progress=False)
    cut = overrides(tmp_path / "cut", **extra)
    with pytest.raises(Stop):
        train(load_config(hidream_config, cut), on_step=stop_at_3, interrupt_types=(Stop,), progress=False)
    train(load_config(hidream_config, {**cut, "resume_from_checkpoint": "latest"}), progress=False)
    a = load_file(str(tmp_path / "full" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "cut" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lora_on_hidream_wraps_every_named_module_and_rejects_to_out0() -> None:
    from tunegraph.trainer.adapters import attach_adapter
    from tunegraph.trainer.config import TrainConfig
    from tunegraph.trainer.errors import ConfigError
    from tunegraph.trainer.models import HiDreamModel, ModelSource

    model = HiDreamModel.load(ModelSource(flavour="tiny", seed=0))
    cfg = TrainConfig.from_dict({"lora_type": "standard", "lora_rank": 2, "flux_lora_target": "all"})
    targets = model.lora_target_presets["all"]
    named = {
        n
        for n, m in model.transformer.named_modules()
        if isinstance(m, torch.nn.Linear) and any(n.endswith("." + t) for t in targets)
    }
    adapter = attach_adapter(model.transformer, cfg, model)
    assert set(adapter.wrapped_module_names) == named and named
    # SimpleTuner's HiDream default list names to_out.0, which HiDream lacks: an error, not less training
    fresh = HiDreamModel.load(ModelSource(flavour="tiny", seed=0))
    with pytest.raises(ConfigError, match="to_out.0"):
        attach_adapter(fresh.transformer, cfg, {"lora_target_presets": {"all": ["to_q", "to_out.0"]}})
