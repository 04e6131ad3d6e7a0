"""trainer/models/weights_file.py and the shipped full-size configs (no ComfyUI needed)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from tunegraph.trainer.errors import ConfigError
from tunegraph.trainer.models.comfy_keys import flux_to_comfy
from tunegraph.trainer.models.single_file import flux_config, hidream_config, shipped_config, vae_config
from tunegraph.trainer.models.weights_file import WeightsFile, empty_weights, load_module


def _write(tmp_path, tensors: dict, name: str = "m.safetensors", metadata: dict | None = None) -> WeightsFile:
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return WeightsFile.open(path, "test.json", "pretrained_transformer_model_name_or_path")


def test_scaled_fp8_folded_and_bookkeeping_hidden(tmp_path) -> None:
    w = torch.randn(8, 4)
    scale = w.abs().max() / 448
    wf = _write(tmp_path, {
        "model.diffusion_model.lin.weight": (w / scale).to(torch.float8_e4m3fn),
        "model.diffusion_model.lin.scale_weight": scale.reshape(()),
        "model.diffusion_model.lin.bias": torch.ones(8),
        "model.diffusion_model.scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn),
        "vae.decoder.conv_in.weight": torch.ones(2, 16, 3, 3),
        "text_encoders.clip_l.transformer.text_model.embeddings.position_ids": torch.zeros(1, 77),
    })  # fmt: skip
    assert wf.prefixes() == {"model.diffusion_model.": 2, "vae.": 1, "text_encoders.": 1}  # no bookkeeping
    model = wf.model_view()
    assert sorted(model.names) == ["lin.bias", "lin.weight"] and model.is_scaled_fp8
    assert model.dtype("lin.weight") == torch.float8_e4m3fn and model.shape("lin.weight") == (8, 4)
    folded = model.tensor("lin.weight", torch.float32)
    assert torch.equal(folded, model.raw("lin.weight").float() * scale)
    assert (folded - w).abs().max() <= 0.07 * w.abs().max()  # fp8's rounding, not the unscaled values
    assert torch.equal(model.tensor("lin.weight", rows=(2, 5)), folded[2:5])
    assert wf.part("vae").names == ["decoder.conv_in.weight"]
    assert wf.part("text_encoders").names == ["clip_l.transformer.text_model.embeddings.position_ids"]


def test_load_module_names_the_file_on_missing_and_unexpected(tmp_path) -> None:
    wf = _write(tmp_path, {"weight": torch.ones(3, 2), "bias": torch.ones(3), "extra": torch.ones(1)})
    with empty_weights():
        module = torch.nn.Linear(2, 3)
    assert module.weight.is_meta
    with pytest.raises(ConfigError, match=r"m\.safetensors.*1 unexpected tensor\(s\), e\.g\. extra"):
        load_module(
            module, {n: (lambda n=n: wf.tensor(n)) for n in wf.names}, torch.float32, where="m.safetensors"
        )
    with pytest.raises(ConfigError, match=r"1 missing tensor\(s\), e\.g\. bias"):
        load_module(module, {"weight": lambda: wf.tensor("weight")}, torch.float32, where="m.safetensors")
    loaded = load_module(module, {n: (lambda n=n: wf.tensor(n)) for n in ("weight", "bias")}, torch.bfloat16)
    assert loaded.weight.dtype == torch.bfloat16 and torch.equal(loaded.weight.float(), torch.ones(3, 2))


class _Shapes:
    """A stand-in view over a module built on the meta device: names and shapes only, no weights."""

    def __init__(self, shapes: dict, metadata: dict | None = None):
        self._shapes, self.metadata = shapes, metadata or {}
        self.names, self.where = list(shapes), "test"

    def __contains__(self, name: str) -> bool:
        return name in self._shapes

    def shape(self, name: str) -> tuple:
        return tuple(self._shapes[name])


def _meta(cls, config: dict) -> dict:
    with torch.device("meta"):
        return {k: v.shape for k, v in cls.from_config(config).state_dict().items()}


@pytest.mark.parametrize("name", ["flux-dev", "flux-schnell"])
def test_full_size_flux_shapes_give_the_shipped_config(name: str) -> None:
    from diffusers import FluxTransformer2DModel

    config = shipped_config(name)
    shapes = _meta(FluxTransformer2DModel, config)
    comfy = flux_to_comfy({k: torch.empty(v, device="meta") for k, v in shapes.items()})
    config.pop("_class_name")
    assert flux_config(_Shapes({k: v.shape for k, v in comfy.items()})) == config


def test_full_size_hidream_and_vae_shapes_give_the_shipped_configs() -> None:
    from diffusers import AutoencoderKL, HiDreamImageTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint  # noqa: F401 (same module)

    config = shipped_config("hidream-i1")
    assert hidream_config(_Shapes(_meta(HiDreamImageTransformer2DModel, config))) == {
        k: v for k, v in config.items() if k != "_class_name"
    }
    vae = shipped_config("flux-vae")
    ldm = {"encoder.down.0.block.0.conv1.weight": (128, 3), "encoder.down.1.block.0.conv1.weight": (256, 128),
           "encoder.down.2.block.0.conv1.weight": (512, 256), "encoder.down.3.block.0.conv1.weight": (512, 512),
           "encoder.down.0.block.1.conv1.weight": (128, 128), "decoder.conv_in.weight": (512, 16, 3, 3),
           "encoder.mid.attn_1.q.weight": (512, 512)}  # fmt: skip
    assert vae_config(_Shapes(ldm)) == {k: v for k, v in vae.items() if k != "_class_name"}
    assert AutoencoderKL.from_config(vae).config.latent_channels == 16
