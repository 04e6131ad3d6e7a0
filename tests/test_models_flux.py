"""Flux model family on the tiny flavour: determinism, encoders, the training forward, save/load."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from diffusers import FluxPipeline

from tunegraph.trainer.adapters.lora import lora_from_config, lora_targets
from tunegraph.trainer.commands.tiny_models import write_tiny_models
from tunegraph.trainer.config import TrainConfig
from tunegraph.trainer.errors import ConfigError
from tunegraph.trainer.models import FAMILIES, FluxModel, ModelSource, get_family, load_model
from tunegraph.trainer.models.flux import latent_image_ids, pack_latents, unpack_latents

PROMPTS = ["a photo of sks dog", "a red car"]


def tiny(seed: int = 0, **kw) -> FluxModel:
    return FluxModel.load(ModelSource(flavour="tiny", seed=seed, **kw))


@pytest.fixture(scope="module")
def model() -> FluxModel:
    return tiny(0)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, model):
    return model.save_pretrained(tmp_path_factory.mktemp("tiny") / "flux")


def _state(m: FluxModel) -> dict[str, torch.Tensor]:
    mods = {"t": m.transformer, "v": m.vae, "c": m.text_encoders[0], "t5": m.text_encoders[1]}
    return {f"{k}.{n}": p for k, mod in mods.items() for n, p in mod.state_dict().items()}


def test_tiny_is_deterministic_from_seed_and_leaves_global_rng_alone(model):
    rng = torch.get_rng_state()
    same, other = tiny(0), tiny(1)
    assert torch.equal(rng, torch.get_rng_state())
    a, b, c = _state(model), _state(same), _state(other)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(not torch.equal(a[k], c[k]) for k in a if a[k].std() > 0)
    assert (same.vae_id, same.text_encoder_id) == (model.vae_id, model.text_encoder_id)
    assert other.vae_id != model.vae_id and other.text_encoder_id != model.text_encoder_id
    assert model.vae_id.startswith("flux-vae-") and model.text_encoder_id.startswith("flux-text-")


def test_model_attributes(model):
    assert (model.family, model.flavour, model.default_shift) == ("flux", "tiny", 3.0)
    assert len(model.text_encoders) == 2 and len(model.tokenizers) == 2
    classes = {type(m).__name__ for m in model.transformer.modules()}
    assert set(model.lycoris_attention_classes) <= classes
    assert model.noise_scheduler.config.use_dynamic_shifting
    assert not any(p.requires_grad for p in model.vae.parameters())


@pytest.mark.parametrize("size", [(64, 64), (64, 96)])
def test_encode_images_is_normalised_mode_and_decodes(model, size):
    pixels = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = model.encode_images(pixels)
    assert latents.shape == (2, 16, size[0] // 8, size[1] // 8)
    raw = model.vae.encode(pixels).latent_dist.mode()
    torch.testing.assert_close(latents, (raw - 0.1159) * 0.3611)
    assert not latents.requires_grad
    decoded = model.decode_latents(latents)
    assert decoded.shape == pixels.shape and decoded.abs().max() <= 1
    torch.testing.assert_close(decoded, model.vae.decode(raw).sample.clamp(-1, 1))


def test_encode_prompts_shapes_and_truncation(model):
    long = "a very long prompt " * 100
    embeds = model.encode_prompts([PROMPTS[0], long, PROMPTS[0]])
    assert embeds["prompt_embeds"].shape == (3, 32, 32)
    assert embeds["pooled_prompt_embeds"].shape == (3, 32)
    mask = embeds["prompt_attention_mask"]
    assert mask[1].sum() == 32 and 0 < mask[0].sum() < 32
    torch.testing.assert_close(embeds["prompt_embeds"][0], embeds["prompt_embeds"][2])
    assert not torch.allclose(embeds["pooled_prompt_embeds"][0], embeds["pooled_prompt_embeds"][1])
    assert model.max_sequence_length == 32 and model.clip_max_length == 32


def test_pack_unpack_match_diffusers():
    x = torch.randn(2, 16, 8, 12)
    packed = pack_latents(x)
    torch.testing.assert_close(packed, FluxPipeline._pack_latents(x, 2, 16, 8, 12))
    torch.testing.assert_close(unpack_latents(packed, 8, 12), x)
    ids = FluxPipeline._prepare_latent_image_ids(2, 4, 6, "cpu", torch.float32)
    torch.testing.assert_close(latent_image_ids(4, 6, torch.device("cpu"), torch.float32), ids)


def test_predict_shapes_gradients_and_dependence(model):
    gen = torch.Generator().manual_seed(1)
    noisy = torch.randn(2, 16, 8, 12, generator=gen)
    embeds = model.encode_prompts(PROMPTS)
    sigmas = torch.tensor([0.3, 0.8])
    model.transformer.zero_grad()
    out = model.predict(noisy, sigmas, embeds)
    assert out.shape == noisy.shape
    out.pow(2).mean().backward()
    grads = [p.grad for p in model.transformer.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    model.transformer.zero_grad()
    with torch.no_grad():
        other_sigma = model.predict(noisy, sigmas.flip(0), embeds)
        other_prompt = model.predict(noisy, sigmas, model.encode_prompts(PROMPTS[::-1]))
        other_guidance = model.predict(noisy, sigmas, embeds, guidance=torch.tensor([4.0, 4.0]))
        broadcast = model.predict(noisy, sigmas, {k: v[:1] for k, v in embeds.items()})
    for changed in (other_sigma, other_prompt, other_guidance):
        assert (changed - out).abs().mean() > 1e-4
    torch.testing.assert_close(broadcast[0], out[0].detach())
    with pytest.raises(ValueError, match="even"):
        model.predict(torch.randn(1, 16, 7, 8), sigmas[:1], embeds)


def test_predict_matches_what_flux_pipeline_feeds_the_transformer(model):
    """Our packing, ids, timestep and guidance scaling equal FluxPipeline's own transformer call."""
    seen = {}

    def grab(module, args, kwargs, output):
        seen.update(kwargs, out=output[0])

    pipe = model.validation_pipeline()
    pipe.set_progress_bar_config(disable=True)
    handle = model.transformer.register_forward_hook(grab, with_kwargs=True)
    try:
        pipe(
            PROMPTS[0],
            height=64,
            width=96,
            num_inference_steps=1,
            guidance_scale=3.5,
            max_sequence_length=model.max_sequence_length,
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
        ours = model.predict(latents, seen["timestep"], embeds, guidance=torch.tensor([3.5]))
        mine = model.encode_prompts([PROMPTS[0]])
    torch.testing.assert_close(pack_latents(ours), seen["out"])
    torch.testing.assert_close(mine["prompt_embeds"], seen["encoder_hidden_states"])


def test_training_steps_reduce_loss(model):
    m = tiny(0)
    gen = torch.Generator().manual_seed(2)
    clean = torch.randn(2, 16, 8, 8, generator=gen)
    noise = torch.randn(2, 16, 8, 8, generator=gen)
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
    assert index["_tunegraph"] == {"family": "flux", "flavour": "tiny"}
    for sub in (
        "transformer",
        "vae",
        "text_encoder",
        "text_encoder_2",
        "tokenizer",
        "tokenizer_2",
        "scheduler",
    ):
        assert (saved / sub).is_dir()
    again = FluxModel.load(ModelSource(pretrained_model_name_or_path=str(saved)))
    assert again.flavour == "tiny"
    assert (again.vae_id, again.text_encoder_id) == (model.vae_id, model.text_encoder_id)
    pixels = torch.rand(1, 3, 64, 64) * 2 - 1
    torch.testing.assert_close(again.encode_images(pixels), model.encode_images(pixels), rtol=0, atol=0)
    a, b = model.encode_prompts(PROMPTS), again.encode_prompts(PROMPTS)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    noisy, sig = torch.randn(2, 16, 8, 12), torch.tensor([0.2, 0.9])
    with torch.no_grad():
        torch.testing.assert_close(model.predict(noisy, sig, a), again.predict(noisy, sig, b), rtol=0, atol=0)
    assert again.noise_scheduler.config.shift == model.noise_scheduler.config.shift
    assert isinstance(FluxPipeline.from_pretrained(str(saved), local_files_only=True), FluxPipeline)


def test_folder_in_bf16_and_flavour_override(saved):
    m = FluxModel.load(
        ModelSource(flavour="dev", pretrained_model_name_or_path=str(saved)), dtype=torch.bfloat16
    )
    assert m.flavour == "dev" and m.dtype == torch.bfloat16
    assert next(m.transformer.parameters()).dtype == torch.bfloat16
    out = m.predict(torch.randn(1, 16, 8, 8), torch.tensor([0.5]), m.encode_prompts(["x"]))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_component_overrides(saved, tmp_path):
    other = tiny(5).save_pretrained(tmp_path / "seed5")
    base = ModelSource(pretrained_model_name_or_path=str(saved))
    m = FluxModel.load(
        ModelSource(
            pretrained_model_name_or_path=str(saved),
            pretrained_transformer_model_name_or_path=str(other / "transformer"),
            pretrained_transformer_subfolder="none",
            pretrained_vae_model_name_or_path=str(other),
        )
    )
    ref, seed5 = FluxModel.load(base), tiny(5)
    assert m.vae_id == seed5.vae_id and m.text_encoder_id == ref.text_encoder_id
    w = "x_embedder.weight"
    assert torch.equal(m.transformer.state_dict()[w], seed5.transformer.state_dict()[w])


def test_libreflux_masks_text_padding(saved):
    krea = FluxModel.load(ModelSource(flavour="krea", pretrained_model_name_or_path=str(saved)))
    libre = FluxModel.load(ModelSource(flavour="libreflux", pretrained_model_name_or_path=str(saved)))
    noisy, sig = torch.randn(1, 16, 8, 8), torch.tensor([0.5])
    with torch.no_grad():
        short = krea.encode_prompts(["a cat"])
        full = krea.encode_prompts(["word " * 100])
        assert (krea.predict(noisy, sig, short) - libre.predict(noisy, sig, short)).abs().max() > 1e-5
        torch.testing.assert_close(krea.predict(noisy, sig, full), libre.predict(noisy, sig, full))


def test_tiny_pipeline_makes_image_of_requested_size(model):
    pipe = model.validation_pipeline()
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        "a photo of sks dog",
        height=64,
        width=96,
        num_inference_steps=2,
        max_sequence_length=model.max_sequence_length,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert image.size == (96, 64)
    assert pipe.transformer is model.transformer and pipe.vae is model.vae


def test_lora_target_presets(model):
    assert set(model.lora_target_presets) == {
        "mmdit",
        "all",
        "all+ffs",
        "context",
        "context+ffs",
        "tiny",
        "nano",
    }
    # The live resolver (adapters/lora.py), as training calls it.
    assert "to_add_out" in lora_targets(TrainConfig.from_dict({"flux_lora_target": "all"}), model)
    assert {"proj_mlp", "ff.net.2"} <= set(
        lora_targets(TrainConfig.from_dict({"flux_lora_target": "all+ffs"}), model)
    )
    nano = lora_targets(TrainConfig.from_dict({"flux_lora_target": "nano"}), model)
    with pytest.raises(
        ConfigError, match="single_transformer_blocks.7.proj_out"
    ):  # no block 7 in the tiny model
        lora_from_config(
            model.transformer, {"rank": 2, "alpha": 2.0, "init": "default", "target_modules": nano}
        )
    with pytest.raises(ConfigError, match="did you mean 'all'"):
        TrainConfig.from_dict({"flux_lora_target": "al"})


@pytest.mark.parametrize(
    ("source", "pattern"),
    [
        (dict(pretrained_model_name_or_path="/nonexistent/flux"), "pretrained_model_name_or_path.*not found"),
        (dict(pretrained_model_name_or_path="black-forest-labs/FLUX.1-dev"), "hub id.*never downloads"),
        (dict(flavour="dev"), "'pretrained_model_name_or_path' is not set.*FLUX.1-dev"),
        (dict(flavour="schnel"), "did you mean 'schnell'"),
        (
            dict(flavour="tiny", pretrained_vae_model_name_or_path="/nope/vae"),
            "pretrained_vae_model_name_or_path",
        ),
    ],
)
def test_load_errors_name_the_key(source, pattern):
    with pytest.raises(ConfigError, match=pattern):
        FluxModel.load(ModelSource(**source))


def test_incomplete_folder_and_single_file_errors(tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(ConfigError, match="no 'transformer/' folder"):
        FluxModel.load(ModelSource(pretrained_model_name_or_path=str(tmp_path)))
    ckpt = tmp_path / "flux.safetensors"
    ckpt.write_bytes(b"")
    with pytest.raises(
        ConfigError, match="pretrained_model_name_or_path.*flux.safetensors.*truncated or corrupt"
    ):
        FluxModel.load(ModelSource(pretrained_model_name_or_path=str(ckpt)))  # issue 13: files are read


def test_get_family_and_load_model_from_config(model):
    assert get_family("flux") is FluxModel and get_family("Flux") is FluxModel and "flux" in FAMILIES
    with pytest.raises(ConfigError, match="did you mean 'flux'"):
        get_family("flx")
    cfg = TrainConfig.from_dict({"model_family": "flux", "model_flavour": "tiny", "seed": "0"})
    assert load_model(cfg).vae_id == model.vae_id


def test_relative_folder_resolves_against_config_dir(saved):
    cfg = TrainConfig.from_dict(
        {"model_family": "flux", "pretrained_model_name_or_path": "flux"}, base_dir=saved.parent
    )
    assert load_model(cfg).flavour == "tiny"


def test_write_tiny_models(tmp_path, model):
    written = write_tiny_models(tmp_path, seed=0)
    assert written == {"flux": tmp_path / "flux"}
    reloaded = FluxModel.load(ModelSource(pretrained_model_name_or_path=str(written["flux"])))
    assert reloaded.vae_id == model.vae_id


def test_ids_are_stable_across_processes(model):
    code = (
        "from tunegraph.trainer.models import FluxModel, ModelSource\n"
        "m = FluxModel.load(ModelSource(flavour='tiny', seed=0))\n"
        "print(m.vae_id, m.text_encoder_id)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == [model.vae_id, model.text_encoder_id]


def test_gradient_checkpointing_gives_the_same_gradients():
    m = tiny(0)
    noisy, sig = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(3)), torch.tensor([0.4])
    embeds = m.encode_prompts(["a cat"])
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            m.transformer.enable_gradient_checkpointing()
        m.transformer.zero_grad()
        m.predict(noisy, sig, embeds).pow(2).mean().backward()
        grads.append(m.transformer.x_embedder.weight.grad.clone())
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1])
