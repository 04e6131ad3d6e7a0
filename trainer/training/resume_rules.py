"""What may change when a run continues from a checkpoint written under another config.

A checkpoint is one run's adapter weights, optimizer moments, data position and random state. A user
who resumes it with an edited config expects the edit to count, or to be told it cannot:

- Refused, with one error naming the keys, before anything is loaded: keys that change what the
  checkpoint *is*. The model (model_type, model_family, model_flavour, the model paths, revision,
  tiny_model_seed, every precision key, mixed_precision); the adapter (lora_type, the lycoris_config
  file's contents, lora_rank, lora_alpha, lora_dropout, flux_lora_target, lora_init_type,
  init_lokr_norm); the data (the data_backend_config file's datasets, except where and when
  their caches are filled; resolution and the other image, bucket and caption keys; seed, which fixes the data order
  and noise the checkpoint continues); the optimizer (its saved moments belong to one algorithm). To change
  one, resume with the checkpoint's values (its `state.json` holds them) or train afresh in another
  output_dir.
- Allowed, listed in one log line, and in effect from the next step: everything else. The learning
  rate and its schedule (learning_rate, lr_scheduler, lr_warmup_steps, lr_end, lr_power) are
  recomputed at the resumed step; max_train_steps / num_train_epochs move the end (and the schedule
  with it); optimizer settings (adam_*, prodigy_d_coef, optimizer_config) are applied to the restored
  optimizer; train_batch_size and gradient_accumulation_steps carry the data position over
  proportionally; ema_decay applies to the restored EMA, and use_ema switched on starts the EMA from
  the resumed weights; gradient clipping, the loss (loss_type, huber_*), flow-matching and guidance
  values, checkpoint, validation, eval and logging settings and cache locations simply apply.
- Not compared: output_dir (a chunk continues another folder's checkpoint), resume_from_checkpoint,
  and the paths of lycoris_config and data_backend_config (their contents are compared instead).

Checkpoints from before this rule carry only a config hash: a changed hash is then a warning.
"""

from __future__ import annotations

import inspect
import json
import logging
from pathlib import Path
from typing import Any

from ..errors import ConfigError, TuneGraphError
from ..jsonfile import load_json

log = logging.getLogger("tunegraph")

MODEL = (
    "model_type", "model_family", "model_flavour", "pretrained_model_name_or_path",
    "pretrained_vae_model_name_or_path", "pretrained_transformer_model_name_or_path",
    "pretrained_transformer_subfolder", "revision", "tiny_model_seed", "base_model_precision",
    "base_model_default_dtype", "text_encoder_1_precision", "text_encoder_2_precision",
    "text_encoder_3_precision", "text_encoder_4_precision", "mixed_precision",
)  # fmt: skip
ADAPTER = (
    "lora_type", "lora_rank", "lora_alpha", "lora_dropout", "flux_lora_target", "lora_init_type",
    "init_lokr_norm",
)  # fmt: skip
DATA = (
    "resolution", "resolution_type", "minimum_image_size", "maximum_image_size", "target_downsample_size",
    "aspect_bucket_rounding", "caption_strategy", "instance_prompt", "caption_dropout_probability", "seed",
    "disable_bucket_pruning",
)  # fmt: skip
FIXED = frozenset((*MODEL, *ADAPTER, *DATA, "optimizer"))
NOT_COMPARED = frozenset(("output_dir", "resume_from_checkpoint", "lycoris_config", "data_backend_config"))
CACHE_KEYS = frozenset((
    "cache_dir", "cache_dir_vae", "cache_dir_text", "write_batch_size", "vae_batch_size",
    "vae_cache_ondemand", "vae_cache_disable",  # when latents are encoded, not what (cache/ondemand.py)
))  # fmt: skip


def _file(cfg: Any, key: str) -> Any:
    """A config file's contents (None when unset or unreadable: loading reports that properly)."""
    if not getattr(cfg, key, None):
        return None
    try:
        return load_json(cfg.input_path(key))
    except (TuneGraphError, OSError):
        return None


def _datasets(entries: Any) -> Any:
    if not isinstance(entries, list):
        return entries
    out = {}
    for i, e in enumerate(entries):
        if isinstance(e, dict):
            out[str(e.get("id", i))] = {k: v for k, v in e.items() if k not in CACHE_KEYS}
    return out


def config_record(cfg: Any) -> dict[str, Any]:
    """What a checkpoint keeps of its config (state.json "config"): every value, plus the contents
    of the LyCORIS and dataset files, so a resume can say which keys changed."""
    record = {
        "values": cfg.to_dict(),
        "lycoris_config": _file(cfg, "lycoris_config"),
        "datasets": _datasets(_file(cfg, "data_backend_config")),
    }
    return json.loads(json.dumps(record, default=str))  # as it reads back from the file


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def _change(key: str, old: Any, new: Any) -> str:
    return f"{key} {_short(old)} -> {_short(new)}"


def _diff(old: Any, new: Any) -> str:
    """'key old -> new; ...' for the top-level keys of two dicts that differ."""
    old, new = old or {}, new or {}
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return "; ".join(_change(k, old.get(k), new.get(k)) for k in keys)


def _file_changes(saved: dict, now: dict) -> list[str]:
    out = []
    if saved.get("lycoris_config") != now.get("lycoris_config"):
        out.append(f"lycoris_config ({_diff(saved.get('lycoris_config'), now.get('lycoris_config'))})")
    old, new = saved.get("datasets") or {}, now.get("datasets") or {}
    for name in sorted(set(old) | set(new)):
        if name not in new or name not in old:
            out.append(f"data_backend_config (dataset '{name}' {'removed' if name not in new else 'added'})")
        elif old[name] != new[name]:
            out.append(f"data_backend_config (dataset '{name}': {_diff(old[name], new[name])})")
    return out


def config_changes(saved: dict, now: dict) -> tuple[list[str], list[str]]:
    """(refused, allowed) changes between a checkpoint's config record and this run's. Keys only
    one side knows (another TuneGraph version) are left out."""
    old, new = saved.get("values", {}), now.get("values", {})
    keys = sorted(k for k in set(old) & set(new) if k not in NOT_COMPARED and old[k] != new[k])
    refused = [_change(k, old[k], new[k]) for k in keys if k in FIXED] + _file_changes(saved, now)
    allowed = [_change(k, old[k], new[k]) for k in keys if k not in FIXED]
    return refused, allowed


def check_resume(path: Path | None, cfg: Any) -> list[str]:
    """Before loading anything: refuse a checkpoint whose defining keys differ from `cfg`'s (ConfigError
    naming them); log the allowed changes in one line and return them."""
    if path is None:
        return []
    try:
        state = json.loads((Path(path) / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []  # load_checkpoint reports a broken checkpoint
    if "config" not in state:
        if state.get("config_hash") not in (None, cfg.config_hash()):
            log.warning(
                "resuming %s, written without its config values: changed keys cannot be checked", path
            )
        return []
    refused, allowed = config_changes(state["config"], config_record(cfg))
    if refused:
        raise ConfigError(
            f"resume_from_checkpoint: {path} was trained with other values of keys that define it: "
            f"{', '.join(refused)}. Resume with the checkpoint's values (in {Path(path) / 'state.json'}), "
            "or train afresh in another output_dir"
        )
    if allowed:
        log.info(
            "resuming %s with changed settings, in effect from the next step: %s", path, ", ".join(allowed)
        )
    return allowed


# -- making the allowed changes take effect on the restored optimizer, schedule and EMA -------------


def optimizer_settings(optimizer: Any) -> list[dict[str, Any]]:
    """The config's hyperparameters in each param group (call before loading the checkpoint's)."""
    names = set(inspect.signature(type(optimizer).__init__).parameters) - {"self", "params", "lr"}
    names.add("initial_lr")  # the scheduler's base learning rate: the config's learning_rate
    return [{k: v for k, v in g.items() if k in names} for g in optimizer.param_groups]


def apply_config(run: Any, settings: list[dict[str, Any]], has_ema_state: bool) -> None:
    """After loading a checkpoint: the config's optimizer settings and learning rate replace the
    saved ones, the learning rate at the resumed step follows the config's schedule; EMA decay too.
    With an unchanged config every value is the one the checkpoint held (resumes stay bit-exact)."""
    groups, sched = run.optimizer.param_groups, run.scheduler
    for group, fresh in zip(groups, settings, strict=True):
        group.update(fresh)
    sched.base_lrs = [g["initial_lr"] for g in groups]
    for group, base, factor in zip(groups, sched.base_lrs, sched.lr_lambdas, strict=True):
        group["lr"] = base * factor(sched.last_epoch)
    sched._last_lr = [g["lr"] for g in groups]
    if run.ema is not None:
        if has_ema_state:
            run.ema.decay = float(run.cfg.ema_decay)
        else:  # use_ema switched on: average from the resumed weights, not the fresh ones
            run.ema = type(run.ema)(run.adapter.parameters(), run.cfg.ema_decay)
