"""Training runs on a quantised tiny Flux base: the loss falls, the file says which base it was
trained on, and stop + resume is still bit-exact."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tunegraph.trainer.adapters import read_adapter_metadata
from tunegraph.trainer.commands.demo import write_demo_config
from tunegraph.trainer.config import load_config
from tunegraph.trainer.training.loop import train

TINY = {"validation_prompt": None, "eval_steps_interval": None, "checkpoint_step_interval": None}
FINAL = "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def demo_config(tmp_path_factory) -> Path:
    return write_demo_config(tmp_path_factory.mktemp("demo"), steps=8)


def config(demo_config: Path, out: Path, **overrides):
    return load_config(demo_config, {**TINY, "output_dir": str(out), **overrides})


@pytest.mark.parametrize(
    "precision, extra",
    [("int8-quanto", {}), ("nf4-bnb", {"lora_type": "standard", "lora_rank": 4, "learning_rate": 3e-3})],
)
def test_eval_loss_falls_on_a_quantised_base(demo_config: Path, tmp_path: Path, precision, extra) -> None:
    cfg = config(
        demo_config,
        tmp_path,
        max_train_steps=60,
        eval_steps_interval=30,
        base_model_precision=precision,
        text_encoder_2_precision="int8-quanto",
        **extra,
    )
    summary = train(cfg, progress=False)
    assert summary["eval_loss_last"] < 0.95 * summary["eval_loss_first"], summary
    meta = read_adapter_metadata(tmp_path / FINAL)
    assert meta["base_precision"] == precision and meta["adapter_kind"] == ("lora" if extra else "lycoris")


class Stop(Exception):
    pass


def test_bit_exact_resume_on_int8_quanto(demo_config: Path, tmp_path: Path) -> None:
    extra = dict(max_train_steps=6, base_model_precision="int8-quanto", lr_scheduler="cosine")
    train(config(demo_config, tmp_path / "full", **extra), progress=False)

    def stop_at_3(step, total, record):
        if step == 3:
            raise Stop

    with pytest.raises(Stop):
        train(config(demo_config, tmp_path / "cut", **extra), on_step=stop_at_3, interrupt_types=(Stop,))
    summary = train(config(demo_config, tmp_path / "cut", resume_from_checkpoint="latest", **extra))
    assert summary["resumed_from"].endswith("checkpoint-3")
    a, b = load_file(str(tmp_path / "full" / FINAL)), load_file(str(tmp_path / "cut" / FINAL))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert read_adapter_metadata(tmp_path / "cut" / FINAL)["base_precision"] == "int8-quanto"
