"""The model-family contract (trainer/models/base.py) on every registered family's tiny flavour:
determinism, encoders, the training forward, save/load, loading errors and the registry.

Parametrised over `FAMILIES` itself, so a newly registered family runs all of it; it fails with a
clear message until it has a row in FACTS. What one family does that the others do not is in
test_model_family_specifics.py.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from child.launch import TESTS, child_cmd
from diffusers import FluxPipeline, HiDreamImagePipeline

from tunegraph.trainer.commands.tiny_models import write_tiny_models
from tunegraph.trainer.config import TrainConfig
from tunegraph.trainer.errors import ConfigError
from tunegraph.trainer.models import FAMILIES, ModelBundle, ModelSource, get_family, load_model

PROMPTS = ["a photo of sks dog", "a red car"]


@dataclass(frozen=True)
class Facts:
    """What a family's tiny flavour must be, beyond what the family class declares."""

    text_encoders: int
    embed_shapes: dict[str, tuple[int, ...]]  # encode_prompts' outputs, per prompt
    attention_classes: list[str]  # LyCORIS `target_module: ["Attention"]` resolves to these
    dynamic_shifting: bool  # resolution-dependent shift (Flux) or a fixed one
    shifts: dict[str, float]  # flavour -> default shift; "tiny" plus one real flavour
    vae_shift_scale: tuple[float, float]  # the real VAE's latent normalisation
    pipeline: type  # plain diffusers loads the saved folder with this class
    odd_latent_error: str
    flavour_typo: tuple[str, str]  # (typo, the flavour did-you-mean names)
    min_routed_expert_grads: int = 0  # MoE: routed experts a batch reaches (others get no gradient)


FLUX_VAE = (0.1159, 0.3611)
FACTS = {
    "flux": Facts(
        text_encoders=2,
        embed_shapes={"prompt_embeds": (32, 32), "pooled_prompt_embeds": (32,), "prompt_attention_mask": (32,)},
        attention_classes=["FluxAttention"],
        dynamic_shifting=True,
        shifts={"tiny": 3.0, "dev": 3.0},
        vae_shift_scale=FLUX_VAE,
        pipeline=FluxPipeline,
        odd_latent_error="even",
        flavour_typo=("schnel", "schnell"),
    ),
    "hidream": Facts(
        text_encoders=4,
        # T5; Llama layers 1 and 2 (layer 0 of 3 is never read); CLIP-L 16 + CLIP-G 24 pooled
        embed_shapes={"t5_prompt_embeds": (32, 32), "llama_prompt_embeds": (2, 32, 48), "pooled_prompt_embeds": (40,)},
        attention_classes=["HiDreamAttention"],
        dynamic_shifting=False,
        shifts={"tiny": 3.0, "dev": 6.0},
        vae_shift_scale=FLUX_VAE,  # HiDream uses the Flux VAE
        pipeline=HiDreamImagePipeline,
        odd_latent_error="multiples of 2",
        flavour_typo=("dve", "dev"),
        min_routed_expert_grads=12,
    ),
}  # fmt: skip


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request) -> type[ModelBundle]:
    return FAMILIES[request.param]


@pytest.fixture(scope="module")
def facts(family) -> Facts:
    if family.family not in FACTS:
        pytest.fail(f"family {family.family!r} is registered but has no row in FACTS ({__file__})")
    return FACTS[family.family]


@pytest.fixture(scope="module")
def model(family, tiny_model) -> ModelBundle:
    return tiny_model(family.family)


@pytest.fixture(scope="module")
def saved(family, tiny_folder) -> Path:
    return tiny_folder(family.family)


def tiny(family: type[ModelBundle], seed: int = 0) -> ModelBundle:
    return family.load(ModelSource(flavour="tiny", seed=seed))


def _state(m: ModelBundle) -> dict[str, torch.Tensor]:
    mods = {"t": m.transformer, "v": m.vae, **{f"te{i}": te for i, te in enumerate(m.text_encoders)}}
    return {f"{k}.{n}": p for k, mod in mods.items() for n, p in mod.state_dict().items()}


def _training_loss(m: ModelBundle, pred: torch.Tensor) -> torch.Tensor:
    """As the loop adds it: a family's auxiliary loss (HiDream's MoE load balancing) joins the loss."""
    aux = getattr(m, "last_aux_loss", None)
    return pred.pow(2).mean() + (0.1 * aux if aux is not None else 0)


# -- registry and identity ---------------------------------------------------------------------------


def test_registry_resolves_the_family_and_load_model_builds_it(family, model):
    name = family.family
    assert name in FAMILIES and FAMILIES[name] is family
    assert get_family(name) is family and get_family(name.capitalize()) is family
    assert get_family(name.upper()) is family
    with pytest.raises(ConfigError, match=f"did you mean '{name}'"):
        get_family(name[:2] + name[3:])
    cfg = TrainConfig.from_dict({"model_family": name, "model_flavour": "tiny", "seed": "0"})
    loaded = load_model(cfg)
    assert (loaded.vae_id, loaded.text_encoder_id) == (model.vae_id, model.text_encoder_id)


def test_tiny_is_deterministic_from_seed_and_leaves_global_rng_alone(family, model):
    rng = torch.get_rng_state()
    same, other = tiny(family, 0), tiny(family, 1)
    assert torch.equal(rng, torch.get_rng_state())
    a, b, c = _state(model), _state(same), _state(other)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(not torch.equal(a[k], c[k]) for k in a if a[k].std() > 0)
    assert (same.vae_id, same.text_encoder_id) == (model.vae_id, model.text_encoder_id)
    assert other.vae_id != model.vae_id and other.text_encoder_id != model.text_encoder_id
    assert model.vae_id.startswith(f"{family.family}-vae-")
    assert model.text_encoder_id.startswith(f"{family.family}-text-")


@pytest.fixture(scope="module", autouse=True)
def ids_child(request, tmp_path_factory):
    """The child process of test_ids_are_stable_across_processes (tests/child/model_ids.py), started
    with this module's first test so its interpreter start (seconds of imports) overlaps the in-process
    tests; None when that test is not selected."""
    if not any(item.name == "test_ids_are_stable_across_processes" for item in request.session.items):
        yield None
        return
    logs = tmp_path_factory.mktemp("model-ids")
    env = {**os.environ, "PYTHONHASHSEED": "random"}  # a fresh string-hash seed even if ours is pinned
    with open(logs / "out", "w") as out, open(logs / "err", "w") as err:
        proc = subprocess.Popen(child_cmd("model_ids"), cwd=TESTS, env=env, stdout=out, stderr=err)
    yield proc, logs
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_ids_are_stable_across_processes(ids_child, tiny_model):
    """Every registered family's ids, computed again in a fresh interpreter (see ids_child)."""
    proc, logs = ids_child
    assert proc.wait(timeout=300) == 0, (logs / "err").read_text()[-3000:]
    ids = json.loads((logs / "out").read_text().strip().splitlines()[-1])
    assert list(ids) == list(FAMILIES)
    for name, (vae_id, text_id) in ids.items():
        assert [vae_id, text_id] == [tiny_model(name).vae_id, tiny_model(name).text_encoder_id]


def test_model_attributes(family, model, facts):
    assert (model.family, model.flavour, model.default_shift) == (family.family, "tiny", facts.shifts["tiny"])
    assert len(model.text_encoders) == len(model.tokenizers) == facts.text_encoders
    assert model.lycoris_attention_classes == facts.attention_classes
    assert set(model.lycoris_attention_classes) <= {type(m).__name__ for m in model.transformer.modules()}
    assert model.noise_scheduler.config.use_dynamic_shifting == facts.dynamic_shifting
    assert model.noise_scheduler.config.shift == model.default_shift
    assert (model.max_sequence_length, model.clip_max_length) == (32, 32)
    assert not any(p.requires_grad for m in (model.vae, *model.text_encoders) for p in m.parameters())


# -- encoders ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(64, 64), (64, 96)])
def test_encode_images_is_normalised_mode_and_decodes(model, facts, size):
    pixels = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = model.encode_images(pixels)
    assert latents.shape == (2, 16, size[0] // 8, size[1] // 8)
    raw = model.vae.encode(pixels).latent_dist.mode()
    shift, scale = facts.vae_shift_scale
    torch.testing.assert_close(latents, (raw - shift) * scale)
    assert not latents.requires_grad
    decoded = model.decode_latents(latents)
    assert decoded.shape == pixels.shape and decoded.abs().max() <= 1
    torch.testing.assert_close(decoded, model.vae.decode(raw).sample.clamp(-1, 1))


def test_encode_prompts_shapes_and_truncation(model, facts):
    long = "a very long prompt " * 100
    embeds = model.encode_prompts([PROMPTS[0], long, PROMPTS[0]])
    assert {k: tuple(v.shape) for k, v in embeds.items()} == {
        k: (3, *s) for k, s in facts.embed_shapes.items()
    }
    for v in embeds.values():
        torch.testing.assert_close(v[0], v[2])
    assert not torch.allclose(embeds["pooled_prompt_embeds"][0], embeds["pooled_prompt_embeds"][1])


# -- the training forward ----------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(8, 8), (8, 12)])
def test_predict_shapes_gradients_and_dependence(family, model, facts, size):
    gen = torch.Generator().manual_seed(1)
    noisy = torch.randn(2, 16, *size, generator=gen)
    embeds = model.encode_prompts(PROMPTS)
    sigmas = torch.tensor([0.3, 0.8])
    model.transformer.zero_grad()
    out = model.predict(noisy, sigmas, embeds)
    assert out.shape == noisy.shape
    out.pow(2).mean().backward()
    grads = {n: p.grad for n, p in model.transformer.named_parameters()}
    # Every weight gets a gradient (an MoE router's gate included), bar routed experts not picked.
    without = [n for n, g in grads.items() if ".experts." not in n and (g is None or not g.any())]
    assert not without, without
    routed = [g for n, g in grads.items() if ".experts." in n and g is not None]
    assert len(routed) >= facts.min_routed_expert_grads and (
        not routed or sum(g.abs().sum() for g in routed) > 0
    )
    model.transformer.zero_grad()
    with torch.no_grad():
        other_sigma = model.predict(noisy, sigmas.flip(0), embeds)
        other_prompt = model.predict(noisy, sigmas, model.encode_prompts(PROMPTS[::-1]))
        guided = model.predict(noisy, sigmas, embeds, guidance=torch.tensor([4.0, 4.0]))
        broadcast = model.predict(noisy, sigmas, {k: v[:1] for k, v in embeds.items()})
        model.transformer.eval()
        in_eval = model.predict(noisy, sigmas, embeds)  # HiDream's MoE: inference path == training path
        model.transformer.train()
    for changed in (other_sigma, other_prompt):
        assert (changed - out).abs().mean() > 1e-4
    if family.guidance_is_cfg:  # no guidance embedding: guidance is real CFG, outside predict
        torch.testing.assert_close(guided, out.detach())
    else:
        assert (guided - out).abs().mean() > 1e-4
    torch.testing.assert_close(in_eval, out.detach())
    torch.testing.assert_close(broadcast[0], out[0].detach())


def test_predict_rejects_odd_latents(model, facts):
    with pytest.raises(ValueError, match=facts.odd_latent_error):
        model.predict(torch.randn(1, 16, 7, 8), torch.tensor([0.5]), model.encode_prompts(["x"]))


def test_training_steps_reduce_loss(family):
    m = tiny(family, 0)
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


def test_gradient_checkpointing_gives_the_same_gradients(family):
    m = tiny(family, 0)
    noisy, sig = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(3)), torch.tensor([0.4])
    embeds = m.encode_prompts(["a cat"])
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            m.transformer.enable_gradient_checkpointing()
        m.transformer.zero_grad()
        _training_loss(m, m.predict(noisy, sig, embeds)).backward()
        grads.append({n: p.grad.clone() for n, p in m.transformer.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and sum(g.abs().sum() for g in grads[0].values()) > 0
    for name, grad in grads[0].items():
        torch.testing.assert_close(grad, grads[1][name], msg=name)


# -- the validation pipeline -------------------------------------------------------------------------


def test_tiny_pipeline_makes_image_of_requested_size(model):
    pipe = model.validation_pipeline()
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        "a photo of sks dog",
        height=64,
        width=96,
        num_inference_steps=1,  # one step, no CFG batch: HiDream pads a non-square forward to 4096 patches
        guidance_scale=1.0,
        max_sequence_length=model.max_sequence_length,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert image.size == (96, 64)
    assert pipe.transformer is model.transformer and pipe.vae is model.vae


# -- save and load -----------------------------------------------------------------------------------


def _numbered(part: str, count: int) -> list[str]:
    return [part] + [f"{part}_{i}" for i in range(2, count + 1)]


def test_save_pretrained_round_trip(family, model, saved, facts):
    index = json.loads((saved / "model_index.json").read_text())
    assert index["_tunegraph"] == {"family": family.family, "flavour": "tiny"}
    parts = ["transformer", "vae", "scheduler", *_numbered("text_encoder", facts.text_encoders),
             *_numbered("tokenizer", facts.text_encoders)]  # fmt: skip
    assert sorted(k for k, v in index.items() if isinstance(v, list) and v[0]) == sorted(parts)
    assert all((saved / part).is_dir() for part in parts)
    again = family.load(ModelSource(pretrained_model_name_or_path=str(saved)))
    assert again.flavour == "tiny"
    assert (again.vae_id, again.text_encoder_id) == (model.vae_id, model.text_encoder_id)
    pixels = torch.rand(1, 3, 64, 64) * 2 - 1
    torch.testing.assert_close(again.encode_images(pixels), model.encode_images(pixels), rtol=0, atol=0)
    a, b = model.encode_prompts(PROMPTS), again.encode_prompts(PROMPTS)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    noisy, sig = torch.randn(2, 16, 8, 8), torch.tensor([0.2, 0.9])  # square: no 4096-patch padding
    with torch.no_grad():
        torch.testing.assert_close(model.predict(noisy, sig, a), again.predict(noisy, sig, b), rtol=0, atol=0)
    assert again.noise_scheduler.config.shift == model.noise_scheduler.config.shift
    assert isinstance(facts.pipeline.from_pretrained(str(saved), local_files_only=True), facts.pipeline)


def test_folder_in_bf16_and_flavour_override(family, saved, facts):
    flavour, shift = next((f, s) for f, s in facts.shifts.items() if f != "tiny")
    m = family.load(
        ModelSource(flavour=flavour, pretrained_model_name_or_path=str(saved)), dtype=torch.bfloat16
    )
    assert (m.flavour, m.default_shift, m.noise_scheduler.config.shift) == (flavour, shift, shift)
    assert m.dtype == torch.bfloat16 and next(m.transformer.parameters()).dtype == torch.bfloat16
    embeds = m.encode_prompts(["x"])
    assert all(v.dtype == torch.bfloat16 for v in embeds.values() if v.is_floating_point())
    out = m.predict(torch.randn(1, 16, 8, 8), torch.tensor([0.5]), embeds)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_component_overrides(family, saved, tmp_path):
    other = tiny(family, 5).save_pretrained(tmp_path / "seed5")
    m = family.load(
        ModelSource(
            pretrained_model_name_or_path=str(saved),
            pretrained_transformer_model_name_or_path=str(other / "transformer"),
            pretrained_transformer_subfolder="none",
            pretrained_vae_model_name_or_path=str(other),
        )
    )
    ref = family.load(ModelSource(pretrained_model_name_or_path=str(saved)))
    seed5 = tiny(family, 5)
    assert m.vae_id == seed5.vae_id and m.text_encoder_id == ref.text_encoder_id
    theirs = seed5.transformer.state_dict()
    assert all(torch.equal(w, theirs[k]) for k, w in m.transformer.state_dict().items())


def test_relative_folder_resolves_against_config_dir(family, saved):
    cfg = TrainConfig.from_dict(
        {"model_family": family.family, "pretrained_model_name_or_path": saved.name}, base_dir=saved.parent
    )
    assert load_model(cfg).flavour == "tiny"


def test_write_tiny_models(family, model, tmp_path):
    written = write_tiny_models(tmp_path, families=(family.family,), seed=0)
    assert written == {family.family: tmp_path / family.family}
    reloaded = family.load(ModelSource(pretrained_model_name_or_path=str(written[family.family])))
    assert reloaded.vae_id == model.vae_id
    assert inspect.signature(write_tiny_models).parameters["families"].default == ("flux",)


# -- loading errors ----------------------------------------------------------------------------------


def test_load_errors_name_the_key(family, facts):
    typo, meant = facts.flavour_typo
    cases = [
        (dict(pretrained_model_name_or_path=f"/nonexistent/{family.family}"), "pretrained_model_name_or_path.*not found"),
        (dict(pretrained_model_name_or_path=next(iter(family.hub_ids.values()))), "hub id.*never downloads"),
        (dict(flavour=typo), f"did you mean '{meant}'"),
        (dict(flavour="tiny", pretrained_vae_model_name_or_path="/nope/vae"), "pretrained_vae_model_name_or_path.*not found"),
        # no folder: every real flavour names what to download
        *((dict(flavour=f), f"'pretrained_model_name_or_path' is not set.*{re.escape(hub)}") for f, hub in family.hub_ids.items()),
    ]  # fmt: skip
    for source, pattern in cases:
        with pytest.raises(ConfigError, match=pattern):
            family.load(ModelSource(**source))


def test_incomplete_folder_and_single_file_errors(family, tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(ConfigError, match="no 'transformer/' folder"):
        family.load(ModelSource(pretrained_model_name_or_path=str(tmp_path)))
    ckpt = tmp_path / f"{family.family}.safetensors"
    ckpt.write_bytes(b"")
    with pytest.raises(
        ConfigError, match=f"pretrained_model_name_or_path.*{family.family}.safetensors.*truncated or corrupt"
    ):
        family.load(ModelSource(pretrained_model_name_or_path=str(ckpt)))  # issue 13: files are read
