"""PEFT LoRA adapters on a tiny diffusers Flux transformer: presets, training, export, reload."""

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny_flux import run, tiny_flux

from tunegraph.trainer.adapters import (
    attach_adapter,
    export_state,
    load_adapter_file,
    load_adapter_state,
    read_adapter_metadata,
    run_metadata,
    save_adapter_state,
)
from tunegraph.trainer.adapters.targets import FLUX_LORA_TARGET_PRESETS
from tunegraph.trainer.config import TrainConfig
from tunegraph.trainer.errors import ConfigError


def lora_cfg(**values) -> TrainConfig:
    return TrainConfig.from_dict({"lora_type": "standard", "lora_rank": 4, **values})


def perturb(adapter) -> None:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def suffix_set(model, targets) -> set[str]:
    return {
        n
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and any(n == t or n.endswith("." + t) for t in targets)
    }


@pytest.mark.parametrize("preset", ["all", "all+ffs", "context", "mmdit"])
def test_flux_lora_target_presets_wrap_the_named_layers(preset):
    model = tiny_flux()
    expected = suffix_set(tiny_flux(), FLUX_LORA_TARGET_PRESETS[preset])
    adapter = attach_adapter(model, lora_cfg(flux_lora_target=preset))
    assert adapter.kind == "lora"
    assert set(adapter.wrapped_module_names) == expected
    assert len(adapter.parameters()) == 2 * len(expected)


def test_all_preset_is_simpletuners_attention_set():
    model = tiny_flux()
    adapter = attach_adapter(model, lora_cfg())  # flux_lora_target defaults to "all"
    assert adapter.wrapped_module_names == sorted(
        [f"transformer_blocks.0.attn.{n}" for n in
         ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out")]
        + [f"single_transformer_blocks.0.attn.{n}" for n in ("to_q", "to_k", "to_v")]
    )  # fmt: skip


def test_only_lora_params_train_and_base_stays_bit_identical():
    model = tiny_flux()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    adapter = attach_adapter(model, lora_cfg(lora_alpha=8))
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in adapter.parameters()}
    opt = torch.optim.AdamW(adapter.parameters(), lr=1e-2)
    for _ in range(3):
        g = torch.Generator().manual_seed(1)
        out = model(
            hidden_states=torch.randn(1, 16, 64, generator=g), encoder_hidden_states=torch.randn(1, 8, 32, generator=g),
            pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.5]),
            img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3), guidance=torch.tensor([1.0]), return_dict=False,
        )[0]  # fmt: skip
        out.square().mean().backward()
        opt.step()
        opt.zero_grad()
    assert any(v.abs().sum() > 0 for k, v in adapter.state_dict().items() if ".lora_B." in k)
    for k, v in model.state_dict().items():
        if k in base:
            assert torch.equal(v, base[k]), k


def test_targets_that_match_nothing_and_unsupported_init_are_errors():
    with pytest.raises(ConfigError, match="single_transformer_blocks.7.proj_out.*FluxAttention"):
        attach_adapter(tiny_flux(), lora_cfg(flux_lora_target="tiny"))  # needs a 38-block model
    with pytest.raises(ConfigError, match="lora_init_type 'pissa' is not supported yet"):
        attach_adapter(tiny_flux(), lora_cfg(lora_init_type="pissa"))


def test_gaussian_init_draws_lora_a_from_normal_one_over_rank():
    torch.manual_seed(0)
    adapter = attach_adapter(tiny_flux(), lora_cfg(lora_init_type="gaussian", lora_rank=8))
    a = torch.cat([v.flatten() for k, v in adapter.state_dict().items() if ".lora_A." in k])
    assert abs(a.std().item() - 1 / 8) < 0.01
    assert all(v.abs().sum() == 0 for k, v in adapter.state_dict().items() if ".lora_B." in k)


def test_export_folds_alpha_and_reload_reproduces_outputs(tmp_path):
    base_out = run(tiny_flux())
    model = tiny_flux()
    cfg = lora_cfg(lora_alpha=8)  # scale 2: the file must carry it inside lora_B
    adapter = attach_adapter(model, cfg)
    perturb(adapter)
    trained = run(model)
    assert (trained - base_out).abs().max() > 1e-3
    path = adapter.save(tmp_path / "pytorch_lora_weights.safetensors", run_metadata(cfg, 3, "h"))
    sd = load_file(str(path))
    state = adapter.state_dict()
    assert set(sd) == {f"transformer.{k}" for k in state}
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in sd)
    key = "transformer_blocks.0.attn.to_q.lora_B.weight"
    torch.testing.assert_close(sd[f"transformer.{key}"], state[key] * 2.0, rtol=0, atol=0)
    meta = read_adapter_metadata(path)
    assert meta["adapter_kind"] == "lora" and meta["family"] == "flux" and meta["step"] == "3"
    lora_meta = json.loads(meta["lora_adapter_metadata"])
    assert lora_meta["transformer.r"] == 4 and lora_meta["transformer.lora_alpha"] == 4
    assert json.loads(meta["adapter_config"])["alpha"] == 8.0
    # ComfyUI reads diffusers LoRA keys with no alpha at scale 1: its delta must be the trained one.
    layer = model.get_submodule("transformer_blocks.0.attn.to_q")
    x = torch.randn(5, 32)
    trained_delta = layer(x) - torch.nn.functional.linear(x, layer.base_layer.weight, layer.base_layer.bias)
    prefix = "transformer.transformer_blocks.0.attn.to_q"
    comfy_delta = x @ (sd[f"{prefix}.lora_B.weight"] @ sd[f"{prefix}.lora_A.weight"]).T
    torch.testing.assert_close(comfy_delta, trained_delta, rtol=1e-5, atol=1e-6)

    fresh = tiny_flux()
    loaded = load_adapter_file(path, fresh)
    assert loaded.kind == "lora" and loaded.wrapped_module_names == adapter.wrapped_module_names
    torch.testing.assert_close(run(fresh), trained, rtol=1e-5, atol=1e-6)
    loaded.remove()
    torch.testing.assert_close(run(fresh), base_out, rtol=0, atol=0)


def test_checkpoint_state_round_trip_and_export(tmp_path):
    cfg = lora_cfg(lora_alpha=2)
    adapter = attach_adapter(tiny_flux(), cfg)
    perturb(adapter)
    save_adapter_state(adapter, tmp_path / "checkpoint-2", run_metadata(cfg, 2, "h"))
    other = attach_adapter(tiny_flux(), cfg)
    load_adapter_state(other, tmp_path / "checkpoint-2")
    for k, v in adapter.state_dict().items():
        assert torch.equal(other.state_dict()[k], v), k
    direct = load_file(str(adapter.save(tmp_path / "d.safetensors")))
    exported = load_file(str(export_state(tmp_path / "checkpoint-2", tmp_path / "e.safetensors")))
    assert direct.keys() == exported.keys() and all(torch.equal(direct[k], exported[k]) for k in direct)


def test_family_bundle_presets_and_partly_matching_preset():
    from tunegraph.trainer.models import FluxModel

    adapter = attach_adapter(tiny_flux(), lora_cfg(flux_lora_target="context+ffs"), FluxModel)
    assert set(adapter.wrapped_module_names) == suffix_set(
        tiny_flux(), FluxModel.lora_target_presets["context+ffs"]
    )
    # one name that matches nothing is an error, never a silently smaller adapter
    family = {"lora_target_presets": {"all": ["to_q", "not_a_layer"]}}
    with pytest.raises(ConfigError, match="'not_a_layer' match no module"):
        attach_adapter(tiny_flux(), lora_cfg(), family)


def test_export_reads_the_training_loops_state_json(tmp_path):
    from safetensors.torch import save_file

    from tunegraph.trainer.commands.export import export_checkpoint

    cfg = lora_cfg(lora_alpha=8)
    adapter = attach_adapter(tiny_flux(), cfg)
    perturb(adapter)
    ckpt = tmp_path / "checkpoint-4"
    ckpt.mkdir()
    save_file({k: v.contiguous() for k, v in adapter.state_dict().items()}, str(ckpt / "adapter.safetensors"))
    state = {"step": 4, "adapter_meta": {**run_metadata(cfg, 4, "hh"), **adapter.file_metadata()}}
    (ckpt / "state.json").write_text(json.dumps(state))
    out = export_checkpoint(ckpt, tmp_path / "final.safetensors")
    direct = load_file(str(adapter.save(tmp_path / "direct.safetensors")))
    exported = load_file(str(out))
    assert direct.keys() == exported.keys() and all(torch.equal(direct[k], exported[k]) for k in direct)
    meta = read_adapter_metadata(out)
    assert (meta["step"], meta["config_hash"], meta["adapter_kind"]) == ("4", "hh", "lora")
