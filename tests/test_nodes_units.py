"""Node-side logic that needs no ComfyUI server: path confinement, run identity, transformer cleanup."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_flux import run

from tunegraph.nodes.adapter_scope import clean_transformer
from tunegraph.nodes.paths import ENV_ROOTS, confine, env_roots
from tunegraph.nodes.run_config import claim_run_dir, finished_adapter, run_identity, write_run_config
from tunegraph.trainer.adapters import attach_adapter
from tunegraph.trainer.adapters.files import write_adapter_file
from tunegraph.trainer.config import TrainConfig
from tunegraph.trainer.errors import ConfigError
from tunegraph.trainer.models.tiny import tiny_flux_transformer
from tunegraph.trainer.training.checkpoint import MARKER

# -- paths ----------------------------------------------------------------------------------------


def test_relative_path_lands_inside_its_base(tmp_path: Path) -> None:
    base = tmp_path / "input"
    assert confine("shapes/set1", base, [base], "x") == base / "shapes" / "set1"


@pytest.mark.parametrize("value", ["../secret", "shapes/../../secret", "a/../b"])
def test_dotdot_is_refused_even_when_it_stays_inside(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError, match=r"contains '\.\.'") as e:
        confine(value, tmp_path, [tmp_path], "LoadDatasetBackend: instance_data_dir")
    assert "LoadDatasetBackend: instance_data_dir" in str(e.value)


def test_absolute_path_outside_roots_is_refused_and_names_the_env_var(tmp_path: Path) -> None:
    root = tmp_path / "input"
    with pytest.raises(ConfigError, match="outside the folders") as e:
        confine("/etc", root, [root], "what")
    assert ENV_ROOTS in str(e.value) and str(root) in str(e.value)


def test_absolute_path_inside_an_owner_root_is_allowed(tmp_path: Path, monkeypatch) -> None:
    extra = tmp_path / "datasets"
    monkeypatch.setenv(ENV_ROOTS, f"{extra}{__import__('os').pathsep}/nonexistent")
    roots = [tmp_path / "input", *env_roots()]
    assert confine(str(extra / "cats"), tmp_path / "input", roots, "x") == extra / "cats"
    # a sibling whose name merely starts like the root is not inside it
    with pytest.raises(ConfigError):
        confine(str(tmp_path / "datasets-evil"), tmp_path / "input", roots, "x")


def test_env_variables_are_filled_before_the_check(tmp_path: Path, monkeypatch) -> None:
    base = tmp_path / "input"
    monkeypatch.setenv("TG_SUBSET", "shapes")
    assert confine("{env:TG_SUBSET}/set1", base, [base], "x") == base / "shapes" / "set1"
    monkeypatch.setenv("TG_SUBSET", "../../etc")  # would climb once the trainer filled it in
    with pytest.raises(ConfigError, match=r"contains '\.\.'"):
        confine("{env:TG_SUBSET}", base, [base], "x")
    monkeypatch.setenv("TG_SUBSET", "/etc")
    with pytest.raises(ConfigError, match="outside the folders"):
        confine("{env:TG_SUBSET}", base, [base], "x")
    kept = confine("cache/{model_family}/{id}", base, [base], "x")  # filled later, by safe values
    assert kept == base / "cache" / "{model_family}" / "{id}"


# -- run identity ---------------------------------------------------------------------------------


def test_identity_ignores_resume_key_but_not_training_values() -> None:
    base = {"learning_rate": 1e-3, "max_train_steps": 10, "resume_from_checkpoint": "latest"}
    same = run_identity({**base, "resume_from_checkpoint": None}, [], None)
    assert run_identity(base, [], None) == same
    assert run_identity({**base, "learning_rate": 2e-3}, [], None) != same
    assert run_identity(base, [], None, start="/x/checkpoint-4") != same


def test_claim_resumes_same_run_and_moves_a_changed_runs_files_aside(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert claim_run_dir(run, "aaa") == "fresh"
    ckpt = run / "checkpoint-4"
    ckpt.mkdir()
    (ckpt / MARKER).write_text('{"step": 4, "files": []}')  # a marker that parses
    assert claim_run_dir(run, "aaa") == "resume"
    assert ckpt.exists()
    assert claim_run_dir(run, "bbb") == "fresh"
    (old,) = (run / "superseded").iterdir()  # a folder of its own, named after the old identity
    assert old.name.startswith("aaa-") and not ckpt.exists() and (old / "checkpoint-4" / MARKER).is_file()
    assert json.loads((run / "tunegraph_run.json").read_text())["identity"] == "bbb"


def test_finished_adapter_needs_same_identity_and_step(tmp_path: Path) -> None:
    run = tmp_path / "run"
    path, identity = write_run_config(run, {"max_train_steps": 5}, [{"id": "d"}], {"algo": "lokr"})
    assert json.loads(path.read_text())["lycoris_config"] == str(
        (run / "config" / "lycoris_config.json").resolve()
    )
    claim_run_dir(run, identity)
    assert finished_adapter(run, identity, 5) is None  # nothing trained yet
    write_adapter_file(run / "pytorch_lora_weights.safetensors", {"w": torch.zeros(1)}, {"step": "5"})
    assert finished_adapter(run, identity, 5) == run / "pytorch_lora_weights.safetensors"
    assert finished_adapter(run, identity, 6) is None
    assert finished_adapter(run, "other", 5) is None


# -- the shared transformer is left as found --------------------------------------------------------


def _cfg(tmp_path: Path, lora_type: str) -> TrainConfig:
    lyco = tmp_path / "lycoris_config.json"
    lyco.write_text(json.dumps({"algo": "lokr", "linear_dim": 10000, "linear_alpha": 1, "factor": 4,
                                "full_matrix": True, "apply_preset": {"target_module": ["Attention"]}}))  # fmt: skip
    keys = {"lora_type": lora_type, "lora_rank": 2, "model_family": "flux"}
    if lora_type == "lycoris":
        keys["lycoris_config"] = str(lyco)
    return TrainConfig.from_dict(keys, base_dir=tmp_path)


@pytest.mark.parametrize("lora_type", ["lycoris", "standard"])
def test_clean_transformer_undoes_an_attached_adapter(tmp_path: Path, lora_type: str) -> None:
    torch.manual_seed(0)
    model = tiny_flux_transformer(guidance_embeds=True).eval()
    before = run(model)
    kinds = {n: type(m) for n, m in model.named_modules()}
    for _ in range(2):  # twice: a second attach after cleanup must work like the first
        with clean_transformer(model):
            adapter = attach_adapter(model, _cfg(tmp_path, lora_type), None)  # None: Flux defaults
            with torch.no_grad():
                for p in adapter.parameters():
                    p.add_(0.05)
            assert not torch.allclose(run(model), before)  # the adapter really acts inside the scope
        assert torch.equal(run(model), before)
        assert {n: type(m) for n, m in model.named_modules()} == kinds
        assert not any("forward" in m.__dict__ for m in model.modules())
        assert not hasattr(model, "peft_config") or not model.peft_config
