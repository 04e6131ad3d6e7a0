"""Adapter files and checkpoint state: load an exported file back, save/load training state, and turn
a checkpoint's raw state into the final file without loading any model.

Checkpoint layout written by `save_adapter_state(adapter, dir)`:
  adapter.safetensors   Adapter.state_dict(): the raw training tensors (LyCORIS: parameters with
                        `scalar` separate, plus each module's `alpha`; LoRA: PEFT keys
                        `<module>.lora_A.weight`, unscaled). Loading these gives bit-exact resume.
  adapter_meta.json     {"tunegraph_format": 1, "kind": "lycoris"|"lora", "config": Adapter.config,
                        "wrapped_module_names": [...], "metadata": {family, flavour, ...} or {}}
or, instead of adapter_meta.json, a state.json whose "adapter_meta" is
  {**run_metadata(cfg, step), **adapter.file_metadata()}   (what training/run.py writes).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..errors import TrainingError
from ..quantize import module_precision
from .base import Adapter
from .files import read_adapter_metadata, read_adapter_tensors, write_adapter_file
from .lora import PREFIX, load_lora_file, lora_file_metadata, lora_file_tensors
from .lycoris import load_lycoris_file, lycoris_file_metadata, lycoris_file_tensors

STATE_FILE = "adapter.safetensors"
META_FILE = "adapter_meta.json"
RUN_STATE_FILE = "state.json"  # the training loop's checkpoint state; its "adapter_meta" works too
log = logging.getLogger("tunegraph")
RUN_KEYS = ("family", "flavour", "base_precision", "step", "config_hash")


def detect_kind(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    if metadata.get("adapter_kind") in ("lycoris", "lora"):
        return metadata["adapter_kind"]
    if any(k.startswith("lycoris_") for k in tensors):
        return "lycoris"
    if any(k.startswith(PREFIX + ".") and ".lora_A." in k for k in tensors):
        return "lora"
    raise TrainingError("adapter file: neither lycoris_ keys nor diffusers transformer.*.lora_A keys found")


def load_adapter_file(path: str | Path, transformer: torch.nn.Module) -> Adapter:
    """Attach an exported adapter file to `transformer` (LyCORIS via create_lycoris_from_weights,
    LoRA via diffusers' load_lora_adapter) so it reproduces the trained model's outputs."""
    metadata = read_adapter_metadata(path)
    tensors = read_adapter_tensors(path)
    warn_precision_mismatch(path, metadata, transformer)
    if detect_kind(tensors, metadata) == "lycoris":
        return load_lycoris_file(tensors, transformer, metadata)
    return load_lora_file(tensors, transformer, metadata)


def warn_precision_mismatch(path: str | Path, metadata: dict[str, str], transformer: torch.nn.Module) -> bool:
    """Warn (and return True) when the file was trained on another base precision than `transformer`
    has: an adapter learns its base's quantisation error, so it is best used on the same precision."""
    trained = metadata.get("base_precision")
    here = module_precision(transformer)
    if not trained or trained == here:
        return False
    log.warning(
        "%s was trained on a %s base, but is being applied to a %s base; outputs will differ from "
        "training. Load the base with base_model_precision=%s to match.",
        path,
        trained,
        here,
        trained,
    )
    return True


def adapter_meta(adapter: Adapter, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """The adapter_meta.json contents (for callers that write checkpoint files themselves)."""
    return {
        "tunegraph_format": 1,
        "kind": adapter.kind,
        "config": adapter.config,
        "wrapped_module_names": adapter.wrapped_module_names,
        "metadata": metadata or {},
    }


def save_adapter_state(
    adapter: Adapter, directory: str | Path, metadata: dict[str, Any] | None = None
) -> Path:
    """Write adapter.safetensors + adapter_meta.json into a checkpoint folder (each atomically)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in adapter.state_dict().items()}
    tmp = directory / (STATE_FILE + ".tmp")
    save_file(state, str(tmp))
    os.replace(tmp, directory / STATE_FILE)
    meta = adapter_meta(adapter, metadata)
    tmp = directory / (META_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True), encoding="utf-8")
    os.replace(tmp, directory / META_FILE)
    return directory / STATE_FILE


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TrainingError(f"{path}: unreadable ({e}); the checkpoint is damaged") from None


def _meta_from_run_state(state: dict[str, Any]) -> dict[str, Any]:
    """The training loop's state.json["adapter_meta"] (run metadata + Adapter.file_metadata())."""
    flat = state.get("adapter_meta") or {}
    config = flat.get("adapter_config", {})
    return {
        "kind": flat.get("adapter_kind"),
        "config": json.loads(config) if isinstance(config, str) else config,
        "metadata": {k: flat[k] for k in RUN_KEYS if k in flat},
    }


def read_adapter_state(directory: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(raw state, adapter meta) of a checkpoint folder: meta from adapter_meta.json, or from the
    training loop's state.json "adapter_meta" entry; clear errors otherwise."""
    directory = Path(directory)
    state_file = directory / STATE_FILE
    if not state_file.is_file():
        raise TrainingError(
            f"checkpoint '{directory}' has no {STATE_FILE}; is it a TuneGraph checkpoint folder?"
        )
    if (directory / META_FILE).is_file():
        meta = _read_json(directory / META_FILE)
    elif (directory / RUN_STATE_FILE).is_file():
        meta = _meta_from_run_state(_read_json(directory / RUN_STATE_FILE))
    else:
        raise TrainingError(f"checkpoint '{directory}' has neither {META_FILE} nor {RUN_STATE_FILE}")
    if meta.get("kind") not in ("lycoris", "lora"):
        raise TrainingError(f"checkpoint '{directory}': unknown adapter kind {meta.get('kind')!r}")
    return load_file(str(state_file)), meta


def load_adapter_state(adapter: Adapter, directory: str | Path) -> dict[str, Any]:
    """Copy a checkpoint's raw adapter state into `adapter`; returns adapter_meta.json's contents."""
    state, meta = read_adapter_state(directory)
    if meta["kind"] != adapter.kind:
        raise TrainingError(
            f"checkpoint '{directory}' holds a {meta['kind']} adapter, this run trains {adapter.kind}"
        )
    adapter.load_state_dict(state)
    return meta


def file_from_state(
    kind: str, config: dict[str, Any], state: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Raw training state -> (file tensors, adapter metadata), without a model."""
    if kind == "lycoris":
        return lycoris_file_tensors(state), lycoris_file_metadata(config)
    return lora_file_tensors(state, config["rank"], config["alpha"]), lora_file_metadata(config)


def export_state(directory: str | Path, out_file: str | Path) -> Path:
    """Write the final adapter file from a checkpoint folder's adapter state (no model needed)."""
    state, meta = read_adapter_state(directory)
    tensors, adapter_meta = file_from_state(meta["kind"], meta["config"], state)
    return write_adapter_file(out_file, tensors, {**meta.get("metadata", {}), **adapter_meta})
