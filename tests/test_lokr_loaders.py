"""An exported LoKr file (full-matrix and decomposed) gives the trained outputs in LyCORIS' own
`create_lycoris_from_weights` and under the LoKr scale rule of a newer ComfyUI (Comfy-Org/ComfyUI
839df9f, comfy/weight_adapter/lokr.py: alpha / dim, with dim = w2.out // w1.out for full-matrix
modules). ComfyUI 0.3.75 itself (which ignores a full-matrix alpha) is checked end to end in
test_parity_adapters.py."""

from __future__ import annotations

import pytest
import torch
from lycoris import create_lycoris_from_weights
from safetensors.torch import load_file
from test_adapters_lycoris import DECOMPOSED, FULL, comfy_lokr_delta, lycoris_cfg, perturb
from tiny_flux import flux_inputs, run, tiny_flux

from tunegraph.trainer.adapters import attach_adapter
from tunegraph.trainer.adapters.lycoris import reset_lycoris_presets


@pytest.mark.parametrize("lyco", [FULL, DECOMPOSED], ids=["full_matrix", "decomposed"])
def test_lycoris_and_newer_comfyui_read_the_file_as_trained(tmp_path, lyco) -> None:
    model = tiny_flux()
    adapter = attach_adapter(model, lycoris_cfg(tmp_path, lyco))
    perturb(adapter)
    trained = run(model)
    sd = load_file(str(adapter.save(tmp_path / "adapter.safetensors", {})))
    assert all(f"{m}.alpha" in sd for m in {k.rsplit(".", 1)[0] for k in sd})  # LyCORIS needs one each

    # LyCORIS' reference loader, as other tools call it (no defaults filled in by us).
    fresh = tiny_flux()
    reset_lycoris_presets()
    network, _ = create_lycoris_from_weights(1.0, None, fresh, weights_sd=dict(sd))
    network.apply_to()
    assert len(network.loras) == len(adapter.wrapped_module_names)
    torch.testing.assert_close(run(fresh), trained, rtol=1e-5, atol=1e-6)

    # A newer ComfyUI's merge rule gives each layer the delta it really adds in training.
    x = flux_inputs()["encoder_hidden_states"][0, :5]
    for name in adapter.wrapped_module_names:
        layer = model.get_submodule(name)
        added = layer(x) - torch.nn.functional.linear(x, layer.weight, layer.bias)
        delta = comfy_lokr_delta(sd, "lycoris_" + name.replace(".", "_"), layer.weight.shape, True)
        torch.testing.assert_close(x @ delta.T, added, rtol=1e-5, atol=1e-6)
