"""HiDream model family on the tiny flavour: encoders, the training forward against diffusers' own
pipeline, MoE load-balancing gradients, save/load, validation sizes, and adapter targets."""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path

import pytest
import torch
from diffusers import HiDreamImagePipeline

from tunegraph.trainer.adapters import attach_adapter
from tunegraph.trainer.adapters.lora import lora_from_config, lora_targets
from tunegraph.trainer.commands.tiny_models import write_tiny_models
from tunegraph.trainer.config import TrainConfig
from tunegraph.trainer.errors import ConfigError
from tunegraph.trainer.models import HiDreamModel, ModelSource, get_family, load_model
from tunegraph.trainer.models.hidream import embed_bytes_per_caption

PROMPTS = ["a photo of sks dog", "a red car"]
REF = Path(__file__).parent / "data" / "reference-configs" / "hidream"


def tiny(seed: int = 0, **kw) -> HiDreamModel:
    return HiDreamModel.load(ModelSource(flavour="tiny", seed=seed, **kw))


@pytest.fixture(scope="module")
def model() -> HiDreamModel:
    return tiny(0)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, model):
    return model.save_pretrained(tmp_path_factory.mktemp("tiny") / "hidream")


def _state(m: HiDreamModel) -> dict[str, torch.Tensor]:
    mods = {"t": m.transformer, "v": m.vae, **{f"te{i}": te for i, te in enumerate(m.text_encoders)}}
    return {f"{k}.{n}": p for k, mod in mods.items() for n, p in mod.state_dict().items()}


def _hook_pipeline(m: HiDreamModel, calls: list, **call_kwargs):
    def grab(module, args, kwargs, output):
        calls.append({**kwargs, "out": output[0]})

    pipe = m.validation_pipeline(call_kwargs.pop("shift", None))
    pipe.set_progress_bar_config(disable=True)
    handle = m.transformer.register_forward_hook(grab, with_kwargs=True)
    try:
        return pipe(
            PROMPTS[0],
            max_sequence_length=m.max_sequence_length,
            generator=torch.Generator().manual_seed(0),
            **call_kwargs,
        )
    finally:
        handle.remove()


def test_tiny_is_deterministic_and_registered(model):
    rng = torch.get_rng_state()
    same, other = tiny(0), tiny(1)
    assert torch.equal(rng, torch.get_rng_state())
    a, b, c = _state(model), _state(same), _state(other)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(not torch.equal(a[k], c[k]) for k in a if a[k].std() > 0)
    assert (same.vae_id, same.text_encoder_id) == (model.vae_id, model.text_encoder_id)
    assert other.text_encoder_id != model.text_encoder_id and model.vae_id.startswith("hidream-vae-")
    assert get_family("HiDream") is HiDreamModel
    cfg = TrainConfig.from_dict({"model_family": "hidream", "model_flavour": "tiny", "seed": "0"})
    assert load_model(cfg).text_encoder_id == model.text_encoder_id
    with pytest.raises(ConfigError, match="did you mean 'dev'"):
        HiDreamModel.load(ModelSource(flavour="dve"))


def test_model_attributes(model):
    assert (model.family, model.flavour, model.default_shift) == ("hidream", "tiny", 3.0)
    assert len(model.text_encoders) == 4 and len(model.tokenizers) == 4
    assert "HiDreamAttention" in {type(m).__name__ for m in model.transformer.modules()}
    assert model.lycoris_attention_classes == ["HiDreamAttention"]
    assert model.noise_scheduler.config.shift == 3.0 and not model.noise_scheduler.config.use_dynamic_shifting
    assert (model.max_sequence_length, model.clip_max_length) == (32, 32)
    assert model.cached_llama_layers == [1, 2] and model.llama_layers == [1, 2, 2]


def test_encode_prompts_matches_pipeline_and_stores_only_read_layers(model):
    long = "a very long prompt " * 20
    embeds = model.encode_prompts([PROMPTS[0], long, PROMPTS[0]])
    assert embeds["t5_prompt_embeds"].shape == (3, 32, 32)
    assert embeds["llama_prompt_embeds"].shape == (3, 2, 32, 48)  # layer 0 of 3 is never read
    assert embeds["pooled_prompt_embeds"].shape == (3, 40)  # CLIP-L 16 + CLIP-G 24
    torch.testing.assert_close(embeds["llama_prompt_embeds"][0], embeds["llama_prompt_embeds"][2])
    assert not torch.allclose(embeds["pooled_prompt_embeds"][0], embeds["pooled_prompt_embeds"][1])
    pipe = model.validation_pipeline()
    t5, _, llama, _, pooled, _ = pipe.encode_prompt(
        prompt=PROMPTS[:1], prompt_2=None, prompt_3=None, prompt_4=None, do_classifier_free_guidance=False,
        max_sequence_length=model.max_sequence_length, device="cpu",
    )  # fmt: skip
    torch.testing.assert_close(embeds["t5_prompt_embeds"][:1], t5)
    torch.testing.assert_close(embeds["pooled_prompt_embeds"][:1], pooled)
    torch.testing.assert_close(
        embeds["llama_prompt_embeds"][:1], llama[[1, 2]].transpose(0, 1), atol=1e-5, rtol=1e-4
    )


@pytest.mark.parametrize("size", [(8, 8), (8, 12)])
def test_predict_shapes_gradients_and_dependence(model, size):
    gen = torch.Generator().manual_seed(1)
    noisy = torch.randn(2, 16, *size, generator=gen)
    embeds = model.encode_prompts(PROMPTS)
    sigmas = torch.tensor([0.3, 0.8])
    model.transformer.zero_grad()
    out = model.predict(noisy, sigmas, embeds)
    assert out.shape == noisy.shape
    out.pow(2).mean().backward()
    grads = {n: p.grad for n, p in model.transformer.named_parameters()}
    assert grads["double_stream_blocks.0.block.ff_i.gate.weight"].abs().sum() > 0  # through the router
    routed = [g for n, g in grads.items() if ".experts." in n and g is not None]
    assert len(routed) >= 12 and sum(g.abs().sum() for g in routed) > 0
    model.transformer.zero_grad()
    with torch.no_grad():
        other_sigma = model.predict(noisy, sigmas.flip(0), embeds)
        other_prompt = model.predict(noisy, sigmas, model.encode_prompts(PROMPTS[::-1]))
        guided = model.predict(noisy, sigmas, embeds, guidance=torch.tensor([4.0, 4.0]))
        broadcast = model.predict(noisy, sigmas, {k: v[:1] for k, v in embeds.items()})
        model.transformer.eval()
        in_eval = model.predict(noisy, sigmas, embeds)
        model.transformer.train()
    for changed in (other_sigma, other_prompt):
        assert (changed - out).abs().mean() > 1e-4
    torch.testing.assert_close(guided, out.detach())  # HiDream has no guidance embedding
    torch.testing.assert_close(in_eval, out.detach())  # MoE inference path == training path
    torch.testing.assert_close(broadcast[0], out[0].detach())


def test_predict_rejects_bad_shapes(model):
    embeds = model.encode_prompts(["x"])
    with pytest.raises(ValueError, match="multiples of 2"):
        model.predict(torch.randn(1, 16, 7, 8), torch.tensor([0.5]), embeds)
    # the tiny model takes what the real one takes: 4096 patches (issue 15); 64x72 patches is more
    with pytest.raises(ValueError, match="non-square images of at most 4096 patches"):
        model.predict(torch.randn(1, 16, 128, 144), torch.tensor([0.5]), embeds)


def test_predict_is_the_negated_transformer_output_the_pipeline_steps_with(model):
    """Same timestep scaling (t = 1000 sigma), sign (pipeline negates), non-square padding and text
    streams as HiDreamImagePipeline's own transformer call."""
    calls = []
    _hook_pipeline(model, calls, height=64, width=96, num_inference_steps=1, guidance_scale=1.0)
    seen = calls[0]
    assert seen["timesteps"].item() == pytest.approx(1000.0)
    latents = seen["hidden_states"]
    assert latents.shape == (1, 16, 8, 12)
    mine = model.encode_prompts([PROMPTS[0]])
    with torch.no_grad():
        ours = model.predict(latents, seen["timesteps"] / 1000, mine)
    torch.testing.assert_close(ours, -seen["out"], atol=1e-5, rtol=1e-4)
    assert model.transformer.training  # the pipeline ran in eval mode and restored train mode


def test_sampling_sigmas_follow_the_pipeline_schedule(model):
    for shift in (None, 6.0):
        calls = []
        image = _hook_pipeline(model, calls, height=64, width=64, num_inference_steps=4, shift=shift,
                               guidance_scale=2.0).images[0]  # fmt: skip
        timesteps = torch.stack([c["timesteps"][0] for c in calls])
        assert len(calls) == 4 and calls[0]["hidden_states"].shape[0] == 2  # real CFG batch
        expected = model.sampling_sigmas(8, 8, 4, shift=shift)
        torch.testing.assert_close(timesteps, expected[:-1] * 1000)
        assert expected[-1] == 0 and image.size == (64, 64)
    shifted = model.sampling_sigmas(8, 8, 4, shift=6.0)
    assert (shifted[1:-1] > model.sampling_sigmas(8, 8, 4)[1:-1]).all()


def test_load_balancing_loss_reaches_router_and_expert_gradients():
    m = tiny(0)
    noisy, sig = (
        torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(4)),
        torch.tensor([0.4, 0.6]),
    )
    embeds = m.encode_prompts(PROMPTS)
    trained = [p for n, p in m.transformer.named_parameters() if ".gate." in n or ".experts." in n]
    m.transformer.requires_grad_(False)
    for p in trained:
        p.requires_grad_(True)
    grads = []
    for weight in (0.0, 0.1):
        m.transformer.zero_grad()
        pred, aux = m.predict(noisy, sig, embeds, return_aux=True)
        assert aux is m.last_aux_loss and aux.requires_grad and 0.5 < aux.item() < 4.0
        (pred.pow(2).mean() + weight * aux).backward()
        grads.append(torch.cat([p.grad.flatten() for p in trained if p.grad is not None]))
    assert (grads[0] - grads[1]).abs().max() > 1e-6
    gate = m.transformer.single_stream_blocks[0].block.ff_i.gate.weight
    m.transformer.zero_grad()
    m.predict(noisy, sig, embeds)
    m.last_aux_loss.backward()
    assert gate.grad.abs().sum() > 0
    with torch.no_grad():
        m.predict(noisy, sig, embeds)
    assert not m.last_aux_loss.requires_grad


def test_gradient_checkpointing_gives_the_same_gradients_and_aux():
    m = tiny(0)
    noisy, sig = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(3)), torch.tensor([0.4])
    embeds = m.encode_prompts(["a cat"])
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            m.transformer.enable_gradient_checkpointing()
        m.transformer.zero_grad()
        pred, aux = m.predict(noisy, sig, embeds, return_aux=True)
        (pred.pow(2).mean() + 0.1 * aux).backward()
        grads.append(m.transformer.double_stream_blocks[0].block.ff_i.gate.weight.grad.clone())
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1])


def test_training_steps_reduce_loss():
    m = tiny(0)
    gen = torch.Generator().manual_seed(2)
    clean, noise = torch.randn(2, 16, 8, 8, generator=gen), torch.randn(2, 16, 8, 8, generator=gen)
    sig = torch.tensor([0.5, 0.5])
    embeds = m.encode_prompts(PROMPTS)
    noisy = (1 - sig[:, None, None, None]) * clean + sig[:, None, None, None] * noise
    opt = torch.optim.Adam(m.transformer.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = (m.predict(noisy, sig, embeds) - (noise - clean)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_save_pretrained_round_trip(model, saved):
    index = json.loads((saved / "model_index.json").read_text())
    assert index["_tunegraph"] == {"family": "hidream", "flavour": "tiny"}
    assert index["text_encoder_4"] == ["transformers", "LlamaForCausalLM"]
    again = HiDreamModel.load(ModelSource(pretrained_model_name_or_path=str(saved)))
    assert again.flavour == "tiny"
    assert (again.vae_id, again.text_encoder_id) == (model.vae_id, model.text_encoder_id)
    a, b = model.encode_prompts(PROMPTS), again.encode_prompts(PROMPTS)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    noisy, sig = torch.randn(2, 16, 8, 12), torch.tensor([0.2, 0.9])
    with torch.no_grad():
        torch.testing.assert_close(model.predict(noisy, sig, a), again.predict(noisy, sig, b), rtol=0, atol=0)
    assert isinstance(
        HiDreamImagePipeline.from_pretrained(str(saved), local_files_only=True), HiDreamImagePipeline
    )


def test_folder_flavours_dtype_and_missing_llama(saved, tmp_path):
    dev = HiDreamModel.load(
        ModelSource(flavour="dev", pretrained_model_name_or_path=str(saved)), dtype=torch.bfloat16
    )
    assert (dev.flavour, dev.default_shift, dev.noise_scheduler.config.shift) == ("dev", 6.0, 6.0)
    out = dev.predict(torch.randn(1, 16, 8, 8), torch.tensor([0.5]), dev.encode_prompts(["x"]))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    assert dev.encode_prompts(["x"])["llama_prompt_embeds"].dtype == torch.bfloat16
    partial = tmp_path / "no_llama"
    partial.mkdir()
    for sub in saved.iterdir():
        if sub.name not in ("text_encoder_4", "tokenizer_4"):
            (partial / sub.name).symlink_to(sub)
    with pytest.raises(ConfigError, match="no 'text_encoder_4/' folder.*Llama-3.1-8B-Instruct"):
        HiDreamModel.load(ModelSource(pretrained_model_name_or_path=str(partial)))
    with pytest.raises(ConfigError, match="not set.*HiDream-I1-Full.*text_encoder_4"):
        HiDreamModel.load(ModelSource(flavour="full"))


def test_write_tiny_models(tmp_path, model):
    written = write_tiny_models(tmp_path, families=("hidream",), seed=0)
    assert written == {"hidream": tmp_path / "hidream"}
    assert (
        HiDreamModel.load(ModelSource(pretrained_model_name_or_path=str(written["hidream"]))).vae_id
        == model.vae_id
    )


def test_embed_bytes_per_caption():
    full = embed_bytes_per_caption()
    assert full == (128 * 4096 + 32 * 128 * 4096 + 2048) * 2  # 33.0 MiB in bf16
    assert embed_bytes_per_caption(
        t5_dim=32, llama_dim=48, tokens=32, llama_layers=[1, 2, 2], pooled_dim=40, bytes_per_value=4
    ) == sum(  # fmt: skip
        t[0].numel() * 4 for t in tiny(0).encode_prompts(["x"]).values()
    )


def _lycoris(tmp_path: Path, name: str) -> TrainConfig:
    return TrainConfig.from_dict({"lora_type": "lycoris", "lycoris_config": str(REF / name)})


def _linears(transformer, keep) -> set[str]:
    return {n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear) and keep(n)}


def test_reference_lycoris_attention_config_wraps_hidream_attention(tmp_path):
    m = tiny(0)
    attn = {n for n, mod in m.transformer.named_modules() if type(mod).__name__ == "HiDreamAttention"}
    adapter = attach_adapter(m.transformer, _lycoris(tmp_path, "lycoris_config.attention.json"), m)
    expected = _linears(m.transformer, lambda n: n.rsplit(".", 1)[0] in attn)
    assert len(expected) == 16 and set(adapter.wrapped_module_names) == expected
    noisy, embeds = torch.randn(1, 16, 8, 8), m.encode_prompts(["a cat"])
    m.predict(noisy, torch.tensor([0.5]), embeds).pow(2).mean().backward()
    assert all(p.grad is not None for p in adapter.parameters())
    assert not any(p.requires_grad for p in m.transformer.parameters() if p not in set(adapter.parameters()))


def test_reference_lycoris_name_algo_map_wraps_exactly_the_named_modules(tmp_path):
    m = tiny(0)
    patterns = json.loads((REF / "lycoris_config.name_algo_map.json").read_text().replace(",\n}", "\n}"))
    adapter = attach_adapter(m.transformer, _lycoris(tmp_path, "lycoris_config.name_algo_map.json"), m)
    names = list(patterns["apply_preset"]["name_algo_map"])
    expected = _linears(m.transformer, lambda n: any(fnmatch.fnmatch(n, p) for p in names))
    wrapped = set(adapter.wrapped_module_names)
    assert wrapped == expected
    assert not any(".experts." in n or "gate" in n for n in wrapped)
    assert {n.split(".block.")[1].split(".")[0] for n in wrapped} == {"attn1", "ff_t", "ff_i"}
    assert sum("shared_experts" in n for n in wrapped) == 9 and sum(".ff_t." in n for n in wrapped) == 3


def test_peft_lora_targets_on_hidream():
    m = tiny(0)
    adapter = attach_adapter(
        m.transformer, TrainConfig.from_dict({"lora_type": "standard", "lora_rank": 2}), m
    )
    wrapped = {n.rsplit(".lora_A", 1)[0] for n in adapter.named_parameters() if ".lora_A" in n}
    attn = _linears(tiny(0).transformer, lambda n: ".attn1." in n)
    assert wrapped == attn and len(wrapped) == 16  # preset "all": both streams, to_out included
    with pytest.raises(ConfigError, match="'to_out.0'"):  # in SimpleTuner's default list, not in HiDream
        lora_from_config(tiny(0).transformer, {"rank": 2, "alpha": 2.0, "init": "default",
                                               "target_modules": ["to_out.0"]})  # fmt: skip
    assert {"to_out", "shared_experts.w2"} <= set(
        lora_targets(TrainConfig.from_dict({"flux_lora_target": "all+ffs"}), m)
    )
