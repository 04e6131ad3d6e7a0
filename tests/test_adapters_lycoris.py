"""LyCORIS LoKr adapters on a tiny diffusers Flux transformer: targets, training, export, reload."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_flux import flux_inputs, run, tiny_flux

from tunegraph.trainer.adapters import (
    attach_adapter,
    export_state,
    load_adapter_file,
    load_adapter_state,
    read_adapter_metadata,
    run_metadata,
    save_adapter_state,
)
from tunegraph.trainer.adapters.files import write_adapter_file
from tunegraph.trainer.adapters.lycoris_config import read_lycoris_config
from tunegraph.trainer.config import TrainConfig
from tunegraph.trainer.errors import ConfigError, TrainingError

REF = Path(__file__).parent / "data" / "reference-configs" / "hidream"
ATTN_PRESET = {"target_module": ["Attention"], "module_algo_map": {"Attention": {"factor": 16}}}
FULL = {"algo": "lokr", "linear_dim": 16384, "linear_alpha": 1, "full_matrix": True, "use_scalar": True,
        "factor": 16, "apply_preset": ATTN_PRESET}  # fmt: skip
DECOMPOSED = {"algo": "lokr", "linear_dim": 2, "linear_alpha": 3, "factor": 4, "full_matrix": False,
              "apply_preset": {"target_module": ["Attention"]}}  # fmt: skip


def lycoris_cfg(tmp_path: Path, lyco: dict, **extra) -> TrainConfig:
    path = tmp_path / "lycoris_config.json"
    path.write_text(json.dumps(lyco))
    return TrainConfig.from_dict({"lora_type": "lycoris", "lycoris_config": str(path), **extra})


def perturb(adapter, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (0.7 if p.ndim == 0 else 0.0))


def attention_linears(model) -> set[str]:
    return {
        f"{name}.{sub}"
        for name, mod in model.named_modules()
        if type(mod).__name__ == "FluxAttention"
        for sub, m in mod.named_modules()
        if isinstance(m, torch.nn.Linear)
    }


def test_attention_preset_wraps_every_flux_attention_linear(tmp_path):
    model = tiny_flux()
    adapter = attach_adapter(model, lycoris_cfg(tmp_path, FULL))
    assert adapter.kind == "lycoris"
    assert set(adapter.wrapped_module_names) == attention_linears(model)
    assert len(adapter.wrapped_module_names) == 11  # 8 joint-block + 3 single-block projections
    assert adapter.config["apply_preset"]["target_module"] == ["FluxAttention"]


def test_reference_hidream_configs_parse_with_trailing_commas():
    attn = read_lycoris_config(REF / "lycoris_config.attention.json")
    assert (attn["algo"], attn["factor"], attn["linear_dim"], attn["full_matrix"]) == (
        "lokr",
        16,
        16384,
        True,
    )
    assert attn["apply_preset"]["target_module"] == ["Attention"]
    assert attn["apply_preset"]["module_algo_map"] == {"Attention": {"factor": 16}}
    names = read_lycoris_config(REF / "lycoris_config.name_algo_map.json")
    assert names["apply_preset"]["use_fnmatch"] is True
    assert len(names["apply_preset"]["name_algo_map"]) == 5
    assert names["use_scalar"] is True and names["linear_alpha"] == 1.0


def test_name_algo_map_with_fnmatch_wraps_exactly_the_named_modules(tmp_path):
    lyco = {"algo": "lokr", "factor": 16, "full_matrix": True, "apply_preset": {
        "name_algo_map": {"transformer_blocks.*.attn.to_q": {"factor": 4}, "single_transformer_blocks.*.proj_*": {}},
        "use_fnmatch": "true"}}  # fmt: skip
    model = tiny_flux()
    adapter = attach_adapter(model, lycoris_cfg(tmp_path, lyco))
    assert adapter.wrapped_module_names == [
        "single_transformer_blocks.0.proj_mlp",
        "single_transformer_blocks.0.proj_out",
        "transformer_blocks.0.attn.to_q",
    ]
    state = adapter.state_dict()
    assert state["lycoris_transformer_blocks_0_attn_to_q.lokr_w1"].shape == (4, 4)  # factor 4 from the map
    assert state["lycoris_single_transformer_blocks_0_proj_mlp.lokr_w1"].shape == (8, 2)  # global factor 16


def test_presets_do_not_leak_between_networks(tmp_path):
    names = {"algo": "lokr", "apply_preset": {"name_algo_map": {"proj_out": {}}}}
    attach_adapter(tiny_flux(), lycoris_cfg(tmp_path, names))
    second = attach_adapter(tiny_flux(), lycoris_cfg(tmp_path, FULL))
    assert "proj_out" not in second.wrapped_module_names
    assert set(second.wrapped_module_names) == attention_linears(tiny_flux())


def test_target_matching_nothing_lists_the_model_classes(tmp_path):
    lyco = {"algo": "lokr", "apply_preset": {"target_module": ["HiDreamAttention"]}}
    with pytest.raises(ConfigError) as err:
        attach_adapter(tiny_flux(), lycoris_cfg(tmp_path, lyco))
    msg = str(err.value)
    assert "HiDreamAttention" in msg and "FluxAttention" in msg and "lycoris_config.json" in msg
    lyco = {
        "algo": "lokr",
        "apply_preset": {"name_algo_map": {"double_stream_blocks.*": {}}, "use_fnmatch": True},
    }
    with pytest.raises(ConfigError, match="double_stream_blocks"):
        attach_adapter(tiny_flux(), lycoris_cfg(tmp_path, lyco))


def test_config_without_algo_or_with_typo_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="'algo' is missing"):
        attach_adapter(tiny_flux(), lycoris_cfg(tmp_path, {"factor": 16}))
    with pytest.raises(ConfigError, match="did you mean 'full_matrix'"):
        attach_adapter(tiny_flux(), lycoris_cfg(tmp_path, {"algo": "lokr", "ful_matrix": True}))


def test_only_adapter_params_train_and_base_stays_bit_identical(tmp_path):
    model = tiny_flux()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    adapter = attach_adapter(model, lycoris_cfg(tmp_path, FULL))
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == set()  # the base is frozen; adapter params live in the network
    assert all(p.requires_grad for p in adapter.parameters())
    before = {k: v.clone() for k, v in adapter.state_dict().items()}
    opt = torch.optim.AdamW(adapter.parameters(), lr=1e-2)
    for _ in range(3):
        loss = model(**flux_inputs(), return_dict=False)[0].square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    after = adapter.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    for k, v in model.state_dict().items():
        assert torch.equal(v, base[k]), k


def comfy_lokr_delta(sd: dict, prefix: str, shape, full_matrix_scaled: bool = False) -> torch.Tensor:
    """ComfyUI's comfy/weight_adapter/lokr.py calculate_weight, reimplemented: alpha/dim is applied
    when a factor is low-rank (dim from w1_b or w2_b), else the scale is 1. `full_matrix_scaled`: the
    newer Comfy-Org/ComfyUI 839df9f rule, where a full-matrix module also gets alpha / (w2.out // w1.out)."""
    w1, w2, dim = sd.get(f"{prefix}.lokr_w1"), sd.get(f"{prefix}.lokr_w2"), None
    if full_matrix_scaled and w1 is not None and w2 is not None:
        dim = w2.shape[0] // w1.shape[0]
    if w1 is None:
        dim = sd[f"{prefix}.lokr_w1_b"].shape[0]
        w1 = sd[f"{prefix}.lokr_w1_a"] @ sd[f"{prefix}.lokr_w1_b"]
    if w2 is None:
        dim = sd[f"{prefix}.lokr_w2_b"].shape[0]
        w2 = sd[f"{prefix}.lokr_w2_a"] @ sd[f"{prefix}.lokr_w2_b"]
    alpha = sd.get(f"{prefix}.alpha")
    scale = float(alpha) / dim if alpha is not None and dim is not None else 1.0
    return torch.kron(w1, w2).reshape(shape) * scale


@pytest.mark.parametrize("lyco", [FULL, DECOMPOSED], ids=["full_matrix", "decomposed"])
def test_export_keys_metadata_and_comfyui_scale(tmp_path, lyco):
    model = tiny_flux()
    cfg = lycoris_cfg(tmp_path, lyco, model_flavour="tiny")
    adapter = attach_adapter(model, cfg)
    perturb(adapter)
    out = adapter.save(tmp_path / "pytorch_lora_weights.safetensors", run_metadata(cfg, 7, "abc123"))
    sd = load_file(str(out))
    modules = {k.rsplit(".", 1)[0] for k in sd}
    assert modules == {"lycoris_" + n.replace(".", "_") for n in adapter.wrapped_module_names}
    assert not any(k.endswith(".scalar") for k in sd)
    if lyco["full_matrix"]:
        for m in modules:  # alpha / (w2.out // w1.out) == 1: a newer ComfyUI's scale (test_lokr_loaders.py)
            assert float(sd[f"{m}.alpha"]) == sd[f"{m}.lokr_w2"].shape[0] // sd[f"{m}.lokr_w1"].shape[0]
    else:
        assert all(float(sd[f"{m}.alpha"]) == 3.0 for m in modules)
    meta = read_adapter_metadata(out)
    assert (meta["family"], meta["flavour"], meta["step"], meta["config_hash"]) == (
        "flux",
        "tiny",
        "7",
        "abc123",
    )
    assert meta["adapter_kind"] == "lycoris" and meta["base_precision"] == "no_change"
    assert json.loads(meta["adapter_config"])["algo"] == "lokr"
    assert json.loads(meta["lycoris_config"])["factor"] == lyco["factor"]
    # The delta ComfyUI builds from the file equals the delta the trained layer really adds.
    x = torch.randn(5, 32)
    for name in adapter.wrapped_module_names:
        layer = model.get_submodule(name)
        trained = layer(x) - torch.nn.functional.linear(x, layer.weight, layer.bias)
        delta = comfy_lokr_delta(sd, "lycoris_" + name.replace(".", "_"), layer.weight.shape)
        torch.testing.assert_close(x @ delta.T, trained, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("lyco", [FULL, DECOMPOSED], ids=["full_matrix", "decomposed"])
def test_export_then_reload_reproduces_outputs(tmp_path, lyco):
    base_out = run(tiny_flux())
    model = tiny_flux()
    adapter = attach_adapter(model, lycoris_cfg(tmp_path, lyco))
    perturb(adapter)
    trained = run(model)
    assert (trained - base_out).abs().max() > 1e-3  # the adapter really changes the output
    path = adapter.save(tmp_path / "a.safetensors")
    fresh = tiny_flux()
    loaded = load_adapter_file(path, fresh)
    assert loaded.kind == "lycoris" and loaded.wrapped_module_names == adapter.wrapped_module_names
    torch.testing.assert_close(run(fresh), trained, rtol=1e-5, atol=1e-6)
    loaded.remove()
    torch.testing.assert_close(run(fresh), base_out, rtol=0, atol=0)
    loaded.restore()
    torch.testing.assert_close(run(fresh), trained, rtol=1e-5, atol=1e-6)


def test_checkpoint_state_round_trip_is_exact_and_exports_without_model(tmp_path):
    model = tiny_flux()
    cfg = lycoris_cfg(tmp_path, FULL)
    adapter = attach_adapter(model, cfg)
    perturb(adapter)
    save_adapter_state(adapter, tmp_path / "checkpoint-5", run_metadata(cfg, 5, "h"))
    other = attach_adapter(tiny_flux(), cfg)
    meta = load_adapter_state(other, tmp_path / "checkpoint-5")
    assert meta["kind"] == "lycoris" and meta["metadata"]["step"] == "5"
    for k, v in adapter.state_dict().items():
        assert torch.equal(other.state_dict()[k], v), k  # scalar stays separate: exact resume
    direct = load_file(str(adapter.save(tmp_path / "direct.safetensors")))
    exported = export_state(tmp_path / "checkpoint-5", tmp_path / "exported.safetensors")
    from_ckpt = load_file(str(exported))
    assert direct.keys() == from_ckpt.keys()
    assert all(torch.equal(direct[k], from_ckpt[k]) for k in direct)
    assert read_adapter_metadata(exported)["step"] == "5"


def test_init_lokr_norm_matches_simpletuner(tmp_path):
    model = tiny_flux()
    adapter = attach_adapter(model, lycoris_cfg(tmp_path, FULL, init_lokr_norm=1e-3))
    assert adapter.config["init_lokr_norm"] == 1e-3
    for lora in adapter.network.loras:
        assert torch.equal(lora.lokr_w1.detach(), torch.ones_like(lora.lokr_w1))
        base = lora.org_module[0].weight.detach()
        w2 = lora.lokr_w2.detach()
        torch.testing.assert_close(w2.mean(), base.mean() * 1e-3, rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(w2.std(), base.std() * 1e-3, rtol=1e-4, atol=1e-9)
    with pytest.raises(ConfigError, match="init_lokr_norm needs"):
        attach_adapter(tiny_flux(), lycoris_cfg(tmp_path, DECOMPOSED, init_lokr_norm=1e-3))


def test_empty_adapter_file_is_refused(tmp_path):
    with pytest.raises(TrainingError, match="no tensors"):
        write_adapter_file(tmp_path / "x.safetensors", {}, {})
    with pytest.raises(TrainingError, match="no adapter.safetensors"):
        export_state(tmp_path / "nothing-here", tmp_path / "out.safetensors")


def test_export_command_writes_the_final_file_from_a_checkpoint(tmp_path):
    from tunegraph.trainer.cli import main
    from tunegraph.trainer.commands.export import export_checkpoint

    cfg = lycoris_cfg(tmp_path, DECOMPOSED)
    model = tiny_flux()
    adapter = attach_adapter(model, cfg)
    perturb(adapter)
    trained = run(model)
    save_adapter_state(adapter, tmp_path / "checkpoint-9", run_metadata(cfg, 9))
    out = export_checkpoint(tmp_path / "checkpoint-9", tmp_path / "final.safetensors")
    fresh = tiny_flux()
    load_adapter_file(out, fresh)
    torch.testing.assert_close(run(fresh), trained, rtol=1e-5, atol=1e-6)
    assert (
        main(
            [
                "export",
                "--checkpoint",
                str(tmp_path / "checkpoint-9"),
                "--out",
                str(tmp_path / "c.safetensors"),
            ]
        )
        == 0
    )
    assert read_adapter_metadata(tmp_path / "c.safetensors")["step"] == "9"
    with pytest.raises(TrainingError, match="does not exist"):
        export_checkpoint(tmp_path / "checkpoint-404", tmp_path / "x.safetensors")


def test_bypass_mode_gives_the_same_outputs_and_is_chosen_for_quantised_bases(tmp_path):
    model = tiny_flux()
    adapter = attach_adapter(model, lycoris_cfg(tmp_path, DECOMPOSED))
    perturb(adapter)
    rebuilt = run(model)
    for lora in adapter.network.loras:
        lora.bypass_mode = True
    torch.testing.assert_close(run(model), rebuilt, rtol=1e-5, atol=1e-6)
    assert "bypass_mode" not in adapter.config

    class QLinear(torch.nn.Linear):  # stands in for optimum-quanto's class, matched by name
        pass

    quantised = tiny_flux()
    old = quantised.transformer_blocks[0].attn.to_q
    quantised.transformer_blocks[0].attn.to_q = QLinear(old.in_features, old.out_features)
    q_adapter = attach_adapter(quantised, lycoris_cfg(tmp_path, DECOMPOSED))
    assert q_adapter.config["bypass_mode"] is True
    assert all(lora.bypass_mode for lora in q_adapter.network.loras)


def test_attention_means_the_family_attention_classes(tmp_path):
    from tunegraph.trainer.models import FluxModel

    lyco = {"algo": "lokr", "apply_preset": {"target_module": ["Attention"]}}
    ok = attach_adapter(tiny_flux(), lycoris_cfg(tmp_path, lyco), FluxModel)
    assert ok.config["apply_preset"]["target_module"] == ["FluxAttention"]
    with pytest.raises(ConfigError, match="HiDreamAttention"):  # a HiDream family on a Flux model
        attach_adapter(tiny_flux(), lycoris_cfg(tmp_path, lyco), {"attention_classes": ["HiDreamAttention"]})
