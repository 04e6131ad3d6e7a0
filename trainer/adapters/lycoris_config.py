"""Reading a SimpleTuner lycoris_config.json and resolving its apply_preset against a model.

Values are coerced like config.json's (string numbers and booleans); unknown keys get a did-you-mean;
`"Attention"` becomes the family's attention classes; every listed class or name must match a module.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from .. import coerce
from ..config import did_you_mean
from ..errors import ConfigError
from ..jsonfile import load_json
from .targets import module_classes, name_matches, no_match_error

log = logging.getLogger("tunegraph")

ALGOS = ("lokr", "locon", "lora", "loha")
_INT_KEYS = ("linear_dim", "factor", "conv_dim")
_FLOAT_KEYS = ("linear_alpha", "multiplier", "conv_alpha", "dropout", "rank_dropout", "module_dropout")
_BOOL_KEYS = (
    "full_matrix", "use_scalar", "decompose_both", "bypass_mode", "use_tucker", "rs_lora",
    "unbalanced_factorization", "train_norm", "rescaled", "dora_wd", "wd_on_output",
    "use_conv_cp", "use_cp", "disable_conv_cp",
)  # fmt: skip
_OTHER_KEYS = ("algo", "apply_preset", "preset", "constraint", "block_size")
KNOWN_KEYS = _INT_KEYS + _FLOAT_KEYS + _BOOL_KEYS + _OTHER_KEYS
_PRESET_KEYS = (
    "target_module",
    "target_name",
    "module_algo_map",
    "name_algo_map",
    "use_fnmatch",
    "exclude_name",
)
_PRESET_KEYS_ALL = _PRESET_KEYS + ("enable_conv", "lora_prefix")


def read_lycoris_config(path: str | Path) -> dict[str, Any]:
    """Load and type-check a lycoris_config.json (lenient JSON, string numbers/booleans)."""
    raw = load_json(path)
    src = str(path)
    if not isinstance(raw, dict):
        raise ConfigError(f'{src}: expected a JSON object like {{"algo": "lokr", "factor": 16}}')
    return normalise_lycoris_config(raw, src)


def normalise_lycoris_config(raw: dict[str, Any], src: str = "<lycoris_config>") -> dict[str, Any]:
    if "algo" not in raw or not raw["algo"]:
        raise ConfigError(f'{src}: key \'algo\' is missing; add e.g. "algo": "lokr"')
    out: dict[str, Any] = {}
    for key, value in raw.items():
        where = f"{src}: key '{key}'"
        if key not in KNOWN_KEYS:
            raise ConfigError(
                f"{where} is not a LyCORIS option TuneGraph knows{did_you_mean(key, KNOWN_KEYS)}"
            )
        if key in _INT_KEYS:
            value = coerce.to_int(value, where)
        elif key in _FLOAT_KEYS:
            value = coerce.to_float(value, where)
        elif key in _BOOL_KEYS:
            value = coerce.to_bool(value, where)
        elif key == "apply_preset":
            value = _check_preset(value, where)
        out[key] = value
    out["algo"] = str(out["algo"]).lower()
    if out["algo"] not in ALGOS:
        raise ConfigError(f"{src}: algo '{out['algo']}' is not supported; use one of {', '.join(ALGOS)}")
    if out.get("dora_wd"):
        raise ConfigError(f"{src}: dora_wd is not offered yet (ComfyUI's DoRA does not match LyCORIS')")
    return out


def _check_preset(preset: Any, where: str) -> dict[str, Any]:
    if preset is None:
        return {}
    if not isinstance(preset, dict):
        raise ConfigError(f"{where} must be an object with target_module / name_algo_map / ...")
    for key in preset:
        if key not in _PRESET_KEYS_ALL:
            raise ConfigError(f"{where}: unknown preset key '{key}'{did_you_mean(key, _PRESET_KEYS_ALL)}")
    if preset.get("lora_prefix", "lycoris") != "lycoris":
        raise ConfigError(f"{where}: lora_prefix must stay 'lycoris' (ComfyUI reads lycoris_ keys)")
    if "use_fnmatch" in preset:
        preset = {**preset, "use_fnmatch": coerce.to_bool(preset["use_fnmatch"], f"{where}.use_fnmatch")}
    return preset


# Quantised Linear classes (optimum-quanto, bitsandbytes): "Linear" in a preset means them too.
QUANT_LINEAR_CLASSES = ("QLinear", "Linear4bit", "Linear8bitLt")


def resolve_preset(
    preset: dict[str, Any], model: torch.nn.Module, aliases: dict[str, list[str]] | list[str]
) -> dict[str, Any]:
    """Replace SimpleTuner's class names by the family's diffusers classes (`aliases`, e.g.
    "Attention" -> HiDreamAttention; a list means the attention classes; a class really named so is
    kept too) and "Linear" by Linear plus the quantised Linear classes present.

    A preset without `target_module` targets no class by itself: lycoris' class default (every
    Linear) would otherwise make a name_algo_map-only preset wrap the whole model, not the names.
    No preset on a quantised model means lycoris' default classes, quantised Linear ones included.
    """
    if not isinstance(aliases, dict):
        aliases = {"Attention": list(aliases)}
    present = set(module_classes(model))
    quant = [c for c in QUANT_LINEAR_CLASSES if c in present]
    linears = (["Linear"] if "Linear" in present or not quant else []) + quant
    if not preset:
        return {"target_module": linears} if quant else {}

    def expand(name: str) -> list[str]:
        if name == "Linear":
            return linears
        if name not in aliases:
            return [name]
        return list(aliases[name]) + ([name] if name in present and name not in aliases[name] else [])

    out = {"target_module": [], **preset}
    if "target_module" in preset:
        out["target_module"] = list(
            dict.fromkeys(c for name in preset["target_module"] for c in expand(name))
        )
    if "module_algo_map" in preset:
        out["module_algo_map"] = {c: v for name, v in preset["module_algo_map"].items() for c in expand(name)}
    return out


def check_targets(preset: dict[str, Any], model: torch.nn.Module, src: str) -> list[str]:
    """Every listed class and name should match a module: when none does it is an error; when some
    do, a warning names the ones that match nothing and what is trained. Returns the warnings."""
    present = set(module_classes(model))
    classes = list(
        dict.fromkeys(list(preset.get("target_module", [])) + list(preset.get("module_algo_map", {})))
    )
    use_fn = bool(preset.get("use_fnmatch", False))
    names = list(preset.get("target_name", [])) + list(preset.get("name_algo_map", {}))
    all_names = [n for n, _ in model.named_modules() if n]
    missing = [c for c in classes if c not in present]
    unmatched = [p for p in names if not any(name_matches(p, n, use_fn) for n in all_names)]
    if not classes and not names:
        return []
    if len(missing) + len(unmatched) == len(classes) + len(names):
        what = "LyCORIS target classes" if not names else "LyCORIS targets"
        raise no_match_error(what, missing + unmatched, model, src)
    if not missing and not unmatched:
        return []
    trained = [c for c in classes if c in present] + [p for p in names if p not in unmatched]
    note = (
        f"{src}: LyCORIS targets {', '.join(repr(t) for t in missing + unmatched)} match no module of this "
        f"model; training only {', '.join(repr(t) for t in trained)}"
    )
    log.warning(note)
    return [note]
