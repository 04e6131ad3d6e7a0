"""Quantised base models and text encoders: SimpleTuner's `base_model_precision` and
`text_encoder_N_precision` values on optimum-quanto, bitsandbytes and torchao.

Only `torch.nn.Linear` layers are quantised (weights only), so norm layers always stay as loaded. Per
family, some Linear layers stay unquantised too (`KEEP`): the embedders and the output layers, which
are small and sensitive. The adapters then run in bypass mode beside the quantised layers
(adapters/lycoris.py, PEFT wraps them as it wraps a Linear); the base weights are never rebuilt.

`quantize_model(model, cfg)` is idempotent: a model already quantised to the same precision (by the
QuantizeModel node, say) is left alone. Before quantising anything on a device, a two-layer probe
runs forward and backward there, so a backend that cannot train on this device fails at once with a
message naming what it needs, not deep inside the first step.
"""

from __future__ import annotations

import fnmatch
import importlib
import logging
from typing import Any

import torch

from .choices import PRECISIONS
from .errors import ConfigError

log = logging.getLogger("tunegraph")

# Which pip package each backend needs (the `quant` extra installs all three).
PACKAGES = {"quanto": "optimum-quanto>=0.2.7", "bnb": "bitsandbytes>=0.45", "torchao": "torchao>=0.10"}
# What a backend needs beyond its package when the probe fails on a device.
NEEDS = {
    "nf4-bnb": "bitsandbytes built for this device (a CUDA GPU, or bitsandbytes>=0.45 for its CPU backend)",
    "fp8-torchao": "a device with float8 matmuls (an NVIDIA GPU of compute capability 8.9+: Ada, Hopper)",
    "fp8-quanto": "a device where optimum-quanto's float8 kernels run (CPU or an NVIDIA GPU)",
}
# Linear layers that stay unquantised (fnmatch patterns on module names; a layer is kept when its
# own name or a parent's name matches). Norm layers are never Linear, so never quantised.
KEEP: dict[str, tuple[str, ...]] = {
    "flux": ("x_embedder", "context_embedder", "proj_out", "norm_out"),
    # HiDream: patch/timestep/pooled embedders, caption projections and the final layer. The MoE
    # router (MoEGate) holds a raw weight Parameter, not a Linear: it stays unquantised as well.
    "hidream": ("x_embedder", "t_embedder", "p_embedder", "caption_projection", "final_layer"),
}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
PRECISION_ATTR = "_tunegraph_precision"


def check_precision(value: str | None, key: str = "base_model_precision") -> str:
    """The precision name, checked; None/"" mean no_change."""
    value = (value or "no_change").strip().lower()
    if value == "fp8-file" and key == "base_model_precision":  # issue 13: set up at load (fp8_base.py)
        return value
    if value not in PRECISIONS:
        from .config import did_you_mean

        raise ConfigError(
            f"key '{key}': '{value}' is not a supported precision{did_you_mean(value, PRECISIONS)}; "
            f"choose one of {', '.join(PRECISIONS)}"
        )
    return value


def backend_of(precision: str) -> str:
    return precision.rsplit("-", 1)[1]


def _import(precision: str, key: str) -> Any:
    backend = backend_of(precision)
    module = {"quanto": "optimum.quanto", "bnb": "bitsandbytes", "torchao": "torchao.quantization"}[backend]
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(
            f"key '{key}': '{precision}' needs {PACKAGES[backend]} ({e}). Install it with "
            f"`pip install 'tunegraph[quant]'` or `pip install '{PACKAGES[backend]}'`, or set {key} to no_change."
        ) from None


def kept(name: str, keep: tuple[str, ...]) -> bool:
    """True when module `name` or one of its parents matches a KEEP pattern."""
    parts = name.split(".")
    prefixes = [".".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatch.fnmatchcase(p, pat) for p in prefixes for pat in keep)


def quantizable_linears(module: torch.nn.Module, keep: tuple[str, ...] = ()) -> list[str]:
    """Names of the plain Linear layers `quantize_module` would quantise."""
    return [
        n
        for n, m in module.named_modules()
        if n and type(m) is torch.nn.Linear and type(m.weight.data) is torch.Tensor and not kept(n, keep)
    ]


def quantize_module(
    module: torch.nn.Module,
    precision: str,
    *,
    keep: tuple[str, ...] = (),
    key: str = "base_model_precision",
) -> int:
    """Quantise the weights of `module`'s Linear layers in place (weight-only, on the device the
    module is on, in its dtype as compute dtype). Returns how many layers were quantised."""
    precision = check_precision(precision, key)
    if precision == "no_change":
        return 0
    lib = _import(precision, key)
    names = quantizable_linears(module, keep)
    if not names:
        return 0
    dtype = next(module.parameters()).dtype
    _QUANTISERS[backend_of(precision)](lib, module, names, precision, dtype)
    setattr(module, PRECISION_ATTR, precision)
    return len(names)


def _quanto(lib: Any, module: torch.nn.Module, names: list[str], precision: str, dtype: torch.dtype) -> None:
    weights = {"int8": lib.qint8, "int4": lib.qint4, "int2": lib.qint2, "fp8": lib.qfloat8}[
        precision.split("-")[0]
    ]
    lib.quantize(module, weights=weights, include=names)
    lib.freeze(module)


def _bnb(lib: Any, module: torch.nn.Module, names: list[str], precision: str, dtype: torch.dtype) -> None:
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = module.get_submodule(parent) if parent else module
        old = getattr(owner, child)
        new = lib.nn.Linear4bit(
            old.in_features,
            old.out_features,
            bias=old.bias is not None,
            compute_dtype=dtype,
            quant_type="nf4",
            device="meta",
        )
        weight = old.weight.data.detach().to("cpu")
        new.weight = lib.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
        if old.bias is not None:
            new.bias = torch.nn.Parameter(old.bias.data.detach().clone(), requires_grad=False)
        setattr(owner, child, new.to(old.weight.device))  # Params4bit quantises on .to()


def _torchao(lib: Any, module: torch.nn.Module, names: list[str], precision: str, dtype: torch.dtype) -> None:
    config = lib.Int8WeightOnlyConfig() if precision.startswith("int8") else lib.Float8WeightOnlyConfig()
    wanted = set(names)
    lib.quantize_(module, config, filter_fn=lambda m, fqn: fqn in wanted)


_QUANTISERS = {"quanto": _quanto, "bnb": _bnb, "torchao": _torchao}


@torch.enable_grad()  # its backward pass must run even when called under no_grad
def probe_backend(precision: str, device: torch.device | str, dtype: torch.dtype, key: str) -> None:
    """Quantise two small Linear layers on `device` and run forward + backward through them (the
    input gradient is what training needs). A failure is a ConfigError naming what the backend needs."""
    if check_precision(precision, key) == "no_change":
        return
    gen = torch.Generator().manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(128, 128), torch.nn.GELU(), torch.nn.Linear(128, 128))
    net = net.to(device=device, dtype=dtype).requires_grad_(False)
    x = torch.randn(4, 128, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)
    try:
        quantize_module(net, precision, key=key)
        net(x).float().square().mean().backward()
        if x.grad is None or not torch.isfinite(x.grad).all():
            raise RuntimeError("no finite input gradient came back through the quantised layers")
    except ConfigError:
        raise
    except Exception as e:  # any backend error: say what it needs instead of a kernel trace
        need = NEEDS.get(precision, f"{PACKAGES[backend_of(precision)]} with support for this device")
        raise ConfigError(
            f"key '{key}': '{precision}' cannot train on {torch.device(device)} here "
            f"({type(e).__name__}: {str(e)[:300]}). It needs {need}; choose another precision "
            f"(int8-quanto and int8-torchao run on CPU and GPU)."
        ) from None


def module_precision(module: torch.nn.Module) -> str:
    """The precision a module was quantised to ("no_change" when it was not), read from the module:
    our own mark first, else the quantised layer classes and weight types."""
    mark = getattr(module, PRECISION_ATTR, None)
    if mark:
        return mark
    for m in module.modules():
        name = type(m).__name__
        if name == "Linear4bit":
            return "nf4-bnb"
        if name == "QLinear":
            qtype = str(getattr(getattr(m, "weight_qtype", None), "name", "int8")).replace("q", "", 1)
            return {"float8": "fp8", "float8_e4m3fn": "fp8"}.get(qtype, qtype) + "-quanto"
        if isinstance(m, torch.nn.Linear) and type(m.weight.data) is not torch.Tensor:
            kind = type(m.weight.data).__name__
            return ("fp8" if "Float8" in kind else "int8") + "-torchao"
    return "no_change"


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds, counting the inner tensors of quantised tensor subclasses (data plus
    scales, shifts) and a bitsandbytes 4-bit weight's quantisation state."""
    if type(t) not in (torch.Tensor, torch.nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        inner, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in inner)
    total = t.numel() * t.element_size()
    state = getattr(t, "quant_state", None)
    if state is not None:
        total += sum(v.numel() * v.element_size() for v in state.as_dict().values() if torch.is_tensor(v))
    return total


def module_bytes(module: torch.nn.Module) -> int:
    """Parameter plus buffer bytes of `module`, quantised or not (each tensor counted once)."""
    seen: set[int] = set()
    total = 0
    for t in [*module.parameters(), *module.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += tensor_bytes(t)
    return total


def _move_for_quantize(cfg: Any, module: torch.nn.Module) -> torch.device:
    """`quantize_via cpu` quantises in host memory (peaks there, not on a small GPU), then moves the
    result back; `accelerator` (the default) quantises where the model already is."""
    device = next(module.parameters()).device
    if (getattr(cfg, "quantize_via", None) or "accelerator") == "cpu" and device.type != "cpu":
        module.to("cpu")
    return device


def _quantize_component(cfg: Any, module: torch.nn.Module, precision: str, keep: tuple, key: str) -> None:
    device = next(module.parameters()).device
    dtype = next(module.parameters()).dtype
    probe_backend(precision, device, dtype, key)
    home = _move_for_quantize(cfg, module)
    count = quantize_module(module, precision, keep=keep, key=key)
    if next(module.parameters()).device != home:
        module.to(home)
    log.info("%s: quantised %d Linear layers to %s", key, count, precision)


@torch.no_grad()  # quantising never needs autograd; under grad mode quanto's in-place abs() fails
def quantize_model(model: Any, cfg: Any) -> Any:
    """Quantise a loaded ModelBundle as `cfg` says: the transformer to base_model_precision (cast
    first to base_model_default_dtype, which becomes the model's compute dtype), each text encoder
    to its text_encoder_N_precision. Idempotent; a model already quantised to another precision is
    an error. The text-encoder cache id changes with the encoders' precisions."""
    base = check_precision(getattr(cfg, "base_model_precision", None))
    _quantize_transformer(model, cfg, base)
    _quantize_text_encoders(model, cfg)
    return model


def _quantize_transformer(model: Any, cfg: Any, precision: str) -> None:
    current = module_precision(model.transformer)
    if precision == "no_change" or current == precision:
        return
    if precision == "fp8-file":  # only a load from an fp8 file sets it up (models/fp8_base.py)
        from .models.fp8_base import not_fp8_file

        raise not_fp8_file(getattr(cfg, "source", "config"), "the loaded transformer")
    if current != "no_change":
        raise ConfigError(
            f"{getattr(cfg, 'source', 'config')}: key 'base_model_precision' is '{precision}' but the model "
            f"given is already quantised to '{current}'; load a fresh model or set the key to '{current}'"
        )
    dtype = DTYPES[getattr(cfg, "base_model_default_dtype", None) or "bf16"]
    if next(model.transformer.parameters()).dtype != dtype:
        torch.nn.Module.to(model.transformer, dtype=dtype)  # diffusers' own .to() warns on every cast
    model.dtype = dtype
    keep = KEEP.get(model.family, ())
    _quantize_component(cfg, model.transformer, precision, keep, "base_model_precision")


def _quantize_text_encoders(model: Any, cfg: Any) -> None:
    from .models.identity import component_id

    changed = []
    for i in range(1, 5):
        key = f"text_encoder_{i}_precision"
        precision = check_precision(getattr(cfg, key, None), key)
        if precision == "no_change":
            continue
        if i > len(model.text_encoders):
            log.warning(
                "%s: %s=%s ignored: %s has %d text encoders",
                getattr(cfg, "source", "config"),
                key,
                precision,
                model.family,
                len(model.text_encoders),
            )
            continue
        encoder = model.text_encoders[i - 1]
        current = module_precision(encoder)
        if current == precision:
            continue
        if current != "no_change":
            raise ConfigError(f"key '{key}': text encoder {i} is already quantised to '{current}'")
        _quantize_component(cfg, encoder, precision, (), key)
        changed.append(f"{i}={precision}")
    if changed:
        # Quantised encoders give (slightly) different embeddings: never reuse a full-precision cache.
        model.text_encoder_id = component_id(
            f"{model.family}-text", [], extra=[model.text_encoder_id, changed]
        )
