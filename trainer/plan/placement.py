"""Where the model is loaded: straight onto the training device, or into host RAM first when the
transformer is to be quantised there (`quantize_via: cpu`) or group-offloaded, so its
full-precision copy never occupies the device (the plan's "load" phase counts on this)."""

from __future__ import annotations

from typing import Any

import torch


def loads_on_host(cfg: Any) -> bool:
    return bool(getattr(cfg, "enable_group_offload", False)) or getattr(cfg, "quantize_via", None) == "cpu"


def load_placed(cfg: Any, device: torch.device | str, dtype: torch.dtype) -> Any:
    """load_model(cfg) on `device`; via host RAM when `loads_on_host(cfg)`. A group-offloaded
    transformer stays in host RAM (offload.py moves its groups); everything else goes to `device`."""
    from ..models import load_model
    from ..quantize import quantize_model

    device = torch.device(device)
    if device.type == "cpu" or not loads_on_host(cfg):
        return load_model(cfg, device=device, dtype=dtype)
    model = load_model(cfg, device="cpu", dtype=dtype)
    quantize_model(model, cfg)  # in host RAM; prepare_run's own call then finds it done
    for module in [model.vae, *model.text_encoders]:
        module.to(device)
    if not getattr(cfg, "enable_group_offload", False):
        model.transformer.to(device)
    model.device = device
    return model
