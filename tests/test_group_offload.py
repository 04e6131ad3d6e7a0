"""Group offload of the frozen transformer while LoKr trains (trainer/plan/offload.py), on CPU.

Offloading to disk really moves the weights: after each group's forward diffusers writes them to
a file and empties them in memory, so a backward pass that read them unloaded would be wrong. The
losses and the adapter after N steps must equal the run without offload; resume must still hold.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tunegraph.trainer.commands.demo import write_demo_config
from tunegraph.trainer.config import load_config
from tunegraph.trainer.errors import ConfigError
from tunegraph.trainer.training.loop import train

TINY = {"validation_prompt": None, "eval_steps_interval": None, "checkpoint_step_interval": None}
STEPS = 4


@pytest.fixture(scope="module")
def demo_config(tmp_path_factory) -> Path:
    return write_demo_config(tmp_path_factory.mktemp("demo"), steps=STEPS)


def _cfg(demo_config: Path, out: Path, **overrides):
    return load_config(demo_config, {**TINY, "output_dir": str(out), "max_train_steps": STEPS, **overrides})


@pytest.fixture(autouse=True)
def poisoned_offload(monkeypatch):
    """After diffusers offloads a group to disk its in-memory tensors are `empty_like` (undefined;
    on a GPU, freed). On CPU the allocator often hands back the same bytes, which would hide a
    backward pass reading offloaded weights: fill them with NaN instead."""
    from diffusers.hooks.group_offloading import ModuleGroup

    original = ModuleGroup._offload_to_disk

    def offload_and_poison(self):
        original(self)
        for t in self.tensor_to_key:
            if t.is_floating_point():
                t.data.fill_(float("nan"))

    monkeypatch.setattr(ModuleGroup, "_offload_to_disk", offload_and_poison)


def _losses(out: Path) -> list[float]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x)["loss"] for x in lines if "loss" in json.loads(x)]


def _offload(tmp_path: Path, kind: str) -> dict:
    return {
        "enable_group_offload": True,
        "group_offload_type": kind,
        "group_offload_blocks_per_group": 1,
        "group_offload_to_disk_path": str(tmp_path / f"offload-{kind}"),
    }


def _assert_equal_runs(a: Path, b: Path) -> None:
    assert _losses(a) == _losses(b)
    wa, wb = (load_file(str(p / "pytorch_lora_weights.safetensors")) for p in (a, b))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "kind,extra",
    [
        ("block_level", {"gradient_checkpointing": True}),
        ("leaf_level", {}),
    ],
)
def test_offloaded_training_equals_plain(demo_config: Path, tmp_path: Path, kind: str, extra: dict) -> None:
    train(_cfg(demo_config, tmp_path / "plain", **extra), progress=False)
    train(_cfg(demo_config, tmp_path / "off", **extra, **_offload(tmp_path, kind)), progress=False)
    assert list((tmp_path / f"offload-{kind}").glob("*.safetensors")), "nothing was offloaded to disk"
    _assert_equal_runs(tmp_path / "plain", tmp_path / "off")


def test_offload_bypass_lokr_and_resume(demo_config: Path, tmp_path: Path) -> None:
    """LyCORIS in bypass mode (as on a quantised base), offloaded, stopped at step 2 and resumed
    to the end == the same run without offload in one go."""
    lyco = json.loads((demo_config.parent / "lycoris_config.json").read_text())
    (tmp_path / "bypass.json").write_text(json.dumps({**lyco, "bypass_mode": True}))
    extra = {"gradient_checkpointing": True, "lycoris_config": str(tmp_path / "bypass.json")}
    train(_cfg(demo_config, tmp_path / "plain", **extra), progress=False)
    off = {**extra, **_offload(tmp_path, "block_level")}
    train(
        _cfg(demo_config, tmp_path / "off", **off, max_train_steps=2), progress=False, final_checkpoint=True
    )
    summary = train(
        _cfg(demo_config, tmp_path / "off", **off, resume_from_checkpoint="latest"), progress=False
    )
    assert summary["resumed_from"].endswith("checkpoint-2")
    _assert_equal_runs(tmp_path / "plain", tmp_path / "off")


def test_offload_refuses_peft_lora(demo_config: Path, tmp_path: Path) -> None:
    cfg = _cfg(demo_config, tmp_path / "lora", lora_type="standard", **_offload(tmp_path, "block_level"))
    with pytest.raises(ConfigError, match="enable_group_offload trains LyCORIS adapters"):
        train(cfg, progress=False)
