"""Resuming under an edited config (trainer/training/resume_rules.py): defining keys are refused by
name before anything loads; the rest are listed and really take effect on the restored state."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tunegraph.trainer.cli import main as cli_main
from tunegraph.trainer.commands.demo import write_demo_config
from tunegraph.trainer.config import load_config
from tunegraph.trainer.errors import ConfigError
from tunegraph.trainer.training import run as run_module
from tunegraph.trainer.training.loop import train
from tunegraph.trainer.training.resume_rules import check_resume, config_changes, config_record

BASE = {
    "validation_prompt": None,
    "eval_steps_interval": None,
    "checkpoint_step_interval": None,
    "lr_scheduler": "constant",
    "lr_warmup_steps": 0,
    "max_train_steps": 3,
}  # the demo's learning_rate is 1e-2 (adamw)


def resumed(demo: Path, run: Path, **changes):
    """The demo config resuming `run`'s latest checkpoint with `changes`."""
    return load_config(demo, {**BASE, "output_dir": str(run), "resume_from_checkpoint": "latest", **changes})


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(demo config, a run folder holding checkpoint-3 of 3 steps at lr 1e-2)."""
    demo = write_demo_config(tmp_path_factory.mktemp("demo"), steps=3)
    out = tmp_path_factory.mktemp("run")
    train(load_config(demo, {**BASE, "output_dir": str(out)}), progress=False, final_checkpoint=True)
    assert (out / "checkpoint-3" / "complete").is_file()
    return demo, out


def copy_run(src: Path, dest: Path) -> Path:
    shutil.copytree(src / "checkpoint-3", dest / "checkpoint-3")
    return dest


def adapter(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt / "adapter.safetensors"))


def max_change(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_checkpoint_keeps_its_config_values_and_files(trained) -> None:
    demo, out = trained
    record = json.loads((out / "checkpoint-3" / "state.json").read_text())["config"]
    assert record["values"]["learning_rate"] == 0.01 and record["values"]["model_flavour"] == "tiny"
    assert record["lycoris_config"]["factor"] == 4
    assert set(record["datasets"]) == {"demo-shapes", "text-embeds"}
    assert "cache_dir_vae" not in record["datasets"]["demo-shapes"]  # where caches live is no change


def test_allowed_change_is_listed_in_one_line_and_takes_effect(trained, tmp_path: Path, caplog) -> None:
    demo, out = trained
    run = copy_run(out, tmp_path / "slow")
    cfg = resumed(demo, run, max_train_steps=6, learning_rate=1e-12, checkpoints_total_limit=5)
    with caplog.at_level(logging.INFO, logger="tunegraph"):
        train(cfg, progress=False, final_checkpoint=True)
    lines = [r.getMessage() for r in caplog.records if "with changed settings" in r.getMessage()]
    assert len(lines) == 1
    for part in ("learning_rate 0.01 -> 1e-12", "max_train_steps 3 -> 6", "checkpoints_total_limit"):
        assert part in lines[0], lines[0]
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["lr"]) for r in records if "loss" in r] == [(4, 1e-12), (5, 1e-12), (6, 1e-12)]
    # AdamW moves each weight by about lr per step: at the new lr the adapter stays put ...
    assert max_change(adapter(run / "checkpoint-3"), adapter(run / "checkpoint-6")) < 1e-9
    # ... at the checkpoint's own lr one step moves it by about 1e-2
    same = copy_run(out, tmp_path / "same")
    train(resumed(demo, same, max_train_steps=4), progress=False, final_checkpoint=True)
    assert max_change(adapter(same / "checkpoint-3"), adapter(same / "checkpoint-4")) > 1e-3


def test_schedule_optimizer_settings_and_ema_follow_the_new_config(trained, tmp_path: Path) -> None:
    demo, out = trained
    run_dir = copy_run(out, tmp_path / "r")
    cfg = resumed(
        demo,
        run_dir,
        max_train_steps=10,
        learning_rate=2e-3,
        lr_scheduler="cosine",
        adam_beta2=0.99,
        use_ema=True,
    )
    run = run_module.prepare_run(cfg)
    group = run.optimizer.param_groups[0]
    expected = 2e-3 * 0.5 * (1 + math.cos(math.pi * 3 / 10))  # cosine over 10 steps, 3 done
    assert group["lr"] == pytest.approx(expected, rel=1e-12) and run.scheduler.get_last_lr()[0] == group["lr"]
    assert group["betas"] == (0.9, 0.99) and group["initial_lr"] == 2e-3
    assert run.optimizer.state  # the moments themselves are the checkpoint's
    params = list(run.adapter.parameters())
    assert all(torch.equal(s, p.detach().float()) for s, p in zip(run.ema.shadow, params, strict=True))


def test_defining_change_is_refused_by_name_before_loading(
    trained, tmp_path: Path, monkeypatch, capsys
) -> None:
    demo, out = trained
    run = copy_run(out, tmp_path / "r")
    lyco = json.loads((demo.parent / "lycoris_config.json").read_text())
    (tmp_path / "lyco.json").write_text(json.dumps({**lyco, "factor": 8}))

    def no_loading(*a, **k):
        raise AssertionError("the model was loaded before the config was checked")

    monkeypatch.setattr(run_module, "prepare_model", no_loading)
    changes = {"seed": 7, "lycoris_config": str(tmp_path / "lyco.json"), "learning_rate": 5e-3}
    with pytest.raises(ConfigError) as err:
        train(resumed(demo, run, **changes))
    msg = str(err.value)
    assert "seed 42 -> 7" in msg and "lycoris_config (factor 4 -> 8)" in msg
    assert "learning_rate" not in msg  # allowed keys are not blamed
    assert str(run / "checkpoint-3") in msg and "another output_dir" in msg

    sets = [f"output_dir={run}", "resume_from_checkpoint=latest", "model_flavour=dev", "validation_prompt="]
    assert cli_main(["train", "--config", str(demo), *[a for s in sets for a in ("--set", s)]]) == 2
    err_lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert len(err_lines) == 1 and 'model_flavour "tiny" -> "dev"' in err_lines[0]


def test_dataset_changes_name_the_dataset_and_paths_alone_are_no_change(trained, tmp_path: Path) -> None:
    demo, out = trained
    saved = json.loads((out / "checkpoint-3" / "state.json").read_text())["config"]
    backends = json.loads((demo.parent / "multidatabackend.json").read_text())
    backends[0]["resolution"] = 128
    backends[0]["cache_dir_vae"] = str(tmp_path / "elsewhere")
    (tmp_path / "mdb.json").write_text(json.dumps(backends))
    cfg = load_config(
        demo, {**BASE, "output_dir": str(tmp_path), "data_backend_config": str(tmp_path / "mdb.json")}
    )
    refused, allowed = config_changes(saved, config_record(cfg))
    assert refused == ["data_backend_config (dataset 'demo-shapes': resolution 64 -> 128)"] and allowed == []


def test_checkpoint_without_config_values_resumes_with_a_warning(trained, tmp_path: Path, caplog) -> None:
    demo, out = trained
    ckpt = shutil.copytree(out / "checkpoint-3", tmp_path / "checkpoint-3")
    state = json.loads((ckpt / "state.json").read_text())
    del state["config"]  # as TuneGraph wrote them before it kept the values
    (ckpt / "state.json").write_text(json.dumps(state))
    cfg = load_config(demo, {**BASE, "output_dir": str(tmp_path), "learning_rate": 5e-3})
    with caplog.at_level(logging.WARNING, logger="tunegraph"):
        assert check_resume(ckpt, cfg) == []
    assert "written without its config values" in caplog.text
