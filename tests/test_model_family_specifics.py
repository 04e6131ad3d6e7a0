"""What one model family does that the others do not, on the tiny flavour (the shared contract is in
test_model_families.py): Flux's packing, guidance and text masks against FluxPipeline, its LoRA
presets; HiDream's Llama layers, negated output and schedule against HiDreamImagePipeline, MoE
load-balancing gradients, the 4096-patch limit, the missing-Llama error and its adapter targets."""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path

import pytest
import torch
from diffusers import FluxPipeline

from tunegraph.trainer.adapters import attach_adapter
from tunegraph.trainer.adapters.lora import lora_from_config, lora_targets
from tunegraph.trainer.config import TrainConfig
from tunegraph.trainer.errors import ConfigError
from tunegraph.trainer.models import FluxModel, HiDreamModel, ModelSource
from tunegraph.trainer.models.flux import latent_image_ids, pack_latents, unpack_latents
from tunegraph.trainer.models.hidream import embed_bytes_per_caption

PROMPTS = ["a photo of sks dog", "a red car"]
REF = Path(__file__).parent / "data" / "reference-configs" / "hidream"


@pytest.fixture(scope="module")
def flux(tiny_model) -> FluxModel:
    return tiny_model("flux")


@pytest.fixture(scope="module")
def hidream(tiny_model) -> HiDreamModel:
    return tiny_model("hidream")


def tiny_hidream(seed: int = 0) -> HiDreamModel:
    return HiDreamModel.load(ModelSource(flavour="tiny", seed=seed))


# -- Flux --------------------------------------------------------------------------------------------


def test_flux_prompt_mask_marks_real_tokens(flux):
    embeds = flux.encode_prompts([PROMPTS[0], "a very long prompt " * 100])
    mask = embeds["prompt_attention_mask"]
    assert mask[1].sum() == 32 and 0 < mask[0].sum() < 32


def test_flux_pack_unpack_match_diffusers():
    x = torch.randn(2, 16, 8, 12)
    packed = pack_latents(x)
    torch.testing.assert_close(packed, FluxPipeline._pack_latents(x, 2, 16, 8, 12))
    torch.testing.assert_close(unpack_latents(packed, 8, 12), x)
    ids = FluxPipeline._prepare_latent_image_ids(2, 4, 6, "cpu", torch.float32)
    torch.testing.assert_close(latent_image_ids(4, 6, torch.device("cpu"), torch.float32), ids)


def test_flux_predict_matches_what_flux_pipeline_feeds_the_transformer(flux):
    """Our packing, ids, timestep and guidance scaling equal FluxPipeline's own transformer call."""
    seen = {}

    def grab(module, args, kwargs, output):
        seen.update(kwargs, out=output[0])

    pipe = flux.validation_pipeline()
    pipe.set_progress_bar_config(disable=True)
    handle = flux.transformer.register_forward_hook(grab, with_kwargs=True)
    try:
        pipe(
            PROMPTS[0],
            height=64,
            width=96,
            num_inference_steps=1,
            guidance_scale=3.5,
            max_sequence_length=flux.max_sequence_length,
            generator=torch.Generator().manual_seed(0),
        )
    finally:
        handle.remove()
    assert seen["timestep"].item() == pytest.approx(pipe.scheduler.sigmas[0].item(), abs=1e-6)
    embeds = {
        "prompt_embeds": seen["encoder_hidden_states"],
        "pooled_prompt_embeds": seen["pooled_projections"],
    }
    latents = unpack_latents(seen["hidden_states"], 8, 12)
    with torch.no_grad():
        ours = flux.predict(latents, seen["timestep"], embeds, guidance=torch.tensor([3.5]))
        mine = flux.encode_prompts([PROMPTS[0]])
    torch.testing.assert_close(pack_latents(ours), seen["out"])
    torch.testing.assert_close(mine["prompt_embeds"], seen["encoder_hidden_states"])


def test_flux_libreflux_masks_text_padding(tiny_folder):
    saved = tiny_folder("flux")
    krea = FluxModel.load(ModelSource(flavour="krea", pretrained_model_name_or_path=str(saved)))
    libre = FluxModel.load(ModelSource(flavour="libreflux", pretrained_model_name_or_path=str(saved)))
    noisy, sig = torch.randn(1, 16, 8, 8), torch.tensor([0.5])
    with torch.no_grad():
        short = krea.encode_prompts(["a cat"])
        full = krea.encode_prompts(["word " * 100])
        assert (krea.predict(noisy, sig, short) - libre.predict(noisy, sig, short)).abs().max() > 1e-5
        torch.testing.assert_close(krea.predict(noisy, sig, full), libre.predict(noisy, sig, full))


def test_flux_lora_target_presets(flux):
    assert set(flux.lora_target_presets) == {
        "mmdit",
        "all",
        "all+ffs",
        "context",
        "context+ffs",
        "tiny",
        "nano",
    }
    # The live resolver (adapters/lora.py), as training calls it.
    assert "to_add_out" in lora_targets(TrainConfig.from_dict({"flux_lora_target": "all"}), flux)
    assert {"proj_mlp", "ff.net.2"} <= set(
        lora_targets(TrainConfig.from_dict({"flux_lora_target": "all+ffs"}), flux)
    )
    nano = lora_targets(TrainConfig.from_dict({"flux_lora_target": "nano"}), flux)
    with pytest.raises(ConfigError, match="single_transformer_blocks.7.proj_out"):  # no block 7 in tiny
        lora_from_config(
            flux.transformer, {"rank": 2, "alpha": 2.0, "init": "default", "target_modules": nano}
        )
    with pytest.raises(ConfigError, match="did you mean 'all'"):
        TrainConfig.from_dict({"flux_lora_target": "al"})


# -- HiDream: text encoders --------------------------------------------------------------------------


def test_hidream_caches_only_the_llama_layers_its_blocks_read(hidream):
    assert hidream.cached_llama_layers == [1, 2] and hidream.llama_layers == [1, 2, 2]


def test_hidream_encode_prompts_matches_pipeline(hidream):
    embeds = hidream.encode_prompts(PROMPTS[:1])
    pipe = hidream.validation_pipeline()
    t5, _, llama, _, pooled, _ = pipe.encode_prompt(
        prompt=PROMPTS[:1], prompt_2=None, prompt_3=None, prompt_4=None, do_classifier_free_guidance=False,
        max_sequence_length=hidream.max_sequence_length, device="cpu",
    )  # fmt: skip
    torch.testing.assert_close(embeds["t5_prompt_embeds"], t5)
    torch.testing.assert_close(embeds["pooled_prompt_embeds"], pooled)
    torch.testing.assert_close(
        embeds["llama_prompt_embeds"], llama[[1, 2]].transpose(0, 1), atol=1e-5, rtol=1e-4
    )


def test_hidream_embed_bytes_per_caption(hidream):
    full = embed_bytes_per_caption()
    assert full == (128 * 4096 + 32 * 128 * 4096 + 2048) * 2  # 33.0 MiB in bf16
    assert embed_bytes_per_caption(
        t5_dim=32, llama_dim=48, tokens=32, llama_layers=[1, 2, 2], pooled_dim=40, bytes_per_value=4
    ) == sum(t[0].numel() * 4 for t in hidream.encode_prompts(["x"]).values())


# -- HiDream: the forward, against its pipeline ------------------------------------------------------


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


def test_hidream_predict_rejects_more_than_4096_patches(hidream):
    # the tiny model takes what the real one takes: 4096 patches (issue 15); 64x72 patches is more
    with pytest.raises(ValueError, match="non-square images of at most 4096 patches"):
        hidream.predict(torch.randn(1, 16, 128, 144), torch.tensor([0.5]), hidream.encode_prompts(["x"]))


def test_hidream_predict_is_the_negated_transformer_output_the_pipeline_steps_with(hidream):
    """Same timestep scaling (t = 1000 sigma), sign (pipeline negates), non-square padding and text
    streams as HiDreamImagePipeline's own transformer call."""
    calls = []
    _hook_pipeline(hidream, calls, height=64, width=96, num_inference_steps=1, guidance_scale=1.0)
    seen = calls[0]
    assert seen["timesteps"].item() == pytest.approx(1000.0)
    latents = seen["hidden_states"]
    assert latents.shape == (1, 16, 8, 12)
    mine = hidream.encode_prompts([PROMPTS[0]])
    with torch.no_grad():
        ours = hidream.predict(latents, seen["timesteps"] / 1000, mine)
    torch.testing.assert_close(ours, -seen["out"], atol=1e-5, rtol=1e-4)
    assert hidream.transformer.training  # the pipeline ran in eval mode and restored train mode


def test_hidream_sampling_sigmas_follow_the_pipeline_schedule(hidream):
    for shift in (None, 6.0):
        calls = []
        image = _hook_pipeline(hidream, calls, height=64, width=64, num_inference_steps=4, shift=shift,
                               guidance_scale=2.0).images[0]  # fmt: skip
        timesteps = torch.stack([c["timesteps"][0] for c in calls])
        assert len(calls) == 4 and calls[0]["hidden_states"].shape[0] == 2  # real CFG batch
        expected = hidream.sampling_sigmas(8, 8, 4, shift=shift)
        torch.testing.assert_close(timesteps, expected[:-1] * 1000)
        assert expected[-1] == 0 and image.size == (64, 64)
    shifted = hidream.sampling_sigmas(8, 8, 4, shift=6.0)
    assert (shifted[1:-1] > hidream.sampling_sigmas(8, 8, 4)[1:-1]).all()


def test_hidream_load_balancing_loss_reaches_router_and_expert_gradients():
    m = tiny_hidream(0)
    noisy = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(4))
    sig = torch.tensor([0.4, 0.6])
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


# -- HiDream: loading --------------------------------------------------------------------------------


def test_hidream_folder_holds_llama_and_errors_without_it(tiny_folder, tmp_path):
    saved = tiny_folder("hidream")
    index = json.loads((saved / "model_index.json").read_text())
    assert index["text_encoder_4"] == ["transformers", "LlamaForCausalLM"]
    partial = tmp_path / "no_llama"
    partial.mkdir()
    for sub in saved.iterdir():
        if sub.name not in ("text_encoder_4", "tokenizer_4"):
            (partial / sub.name).symlink_to(sub)
    with pytest.raises(ConfigError, match="no 'text_encoder_4/' folder.*Llama-3.1-8B-Instruct"):
        HiDreamModel.load(ModelSource(pretrained_model_name_or_path=str(partial)))
    with pytest.raises(ConfigError, match="not set.*HiDream-I1-Full.*text_encoder_4"):
        HiDreamModel.load(ModelSource(flavour="full"))


# -- HiDream: adapter targets ------------------------------------------------------------------------


def _lycoris(name: str) -> TrainConfig:
    return TrainConfig.from_dict({"lora_type": "lycoris", "lycoris_config": str(REF / name)})


def _linears(transformer, keep) -> set[str]:
    return {n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear) and keep(n)}


def test_hidream_reference_lycoris_attention_config_wraps_hidream_attention():
    m = tiny_hidream(0)
    attn = {n for n, mod in m.transformer.named_modules() if type(mod).__name__ == "HiDreamAttention"}
    adapter = attach_adapter(m.transformer, _lycoris("lycoris_config.attention.json"), m)
    expected = _linears(m.transformer, lambda n: n.rsplit(".", 1)[0] in attn)
    assert len(expected) == 16 and set(adapter.wrapped_module_names) == expected
    noisy, embeds = torch.randn(1, 16, 8, 8), m.encode_prompts(["a cat"])
    m.predict(noisy, torch.tensor([0.5]), embeds).pow(2).mean().backward()
    assert all(p.grad is not None for p in adapter.parameters())
    assert not any(p.requires_grad for p in m.transformer.parameters() if p not in set(adapter.parameters()))


def test_hidream_reference_lycoris_name_algo_map_wraps_exactly_the_named_modules():
    m = tiny_hidream(0)
    patterns = json.loads((REF / "lycoris_config.name_algo_map.json").read_text().replace(",\n}", "\n}"))
    adapter = attach_adapter(m.transformer, _lycoris("lycoris_config.name_algo_map.json"), m)
    names = list(patterns["apply_preset"]["name_algo_map"])
    expected = _linears(m.transformer, lambda n: any(fnmatch.fnmatch(n, p) for p in names))
    wrapped = set(adapter.wrapped_module_names)
    assert wrapped == expected
    assert not any(".experts." in n or "gate" in n for n in wrapped)
    assert {n.split(".block.")[1].split(".")[0] for n in wrapped} == {"attn1", "ff_t", "ff_i"}
    assert sum("shared_experts" in n for n in wrapped) == 9 and sum(".ff_t." in n for n in wrapped) == 3


def test_hidream_peft_lora_targets(hidream):
    m = tiny_hidream(0)
    adapter = attach_adapter(
        m.transformer, TrainConfig.from_dict({"lora_type": "standard", "lora_rank": 2}), m
    )
    wrapped = {n.rsplit(".lora_A", 1)[0] for n in adapter.named_parameters() if ".lora_A" in n}
    attn = _linears(hidream.transformer, lambda n: ".attn1." in n)
    assert wrapped == attn and len(wrapped) == 16  # preset "all": both streams, to_out included
    with pytest.raises(ConfigError, match="'to_out.0'"):  # in SimpleTuner's default list, not in HiDream
        lora_from_config(hidream.transformer, {"rank": 2, "alpha": 2.0, "init": "default",
                                               "target_modules": ["to_out.0"]})  # fmt: skip
    assert {"to_out", "shared_experts.w2"} <= set(
        lora_targets(TrainConfig.from_dict({"flux_lora_target": "all+ffs"}), m)
    )
