"""`tunegraph export --checkpoint DIR --out FILE`: a checkpoint folder -> the final adapter file.

Contract with the training loop: a checkpoint folder holds
  adapter.safetensors   `Adapter.state_dict()` (raw training tensors; see adapters/export.py)
  adapter_meta.json     `adapters.adapter_meta(adapter, run_metadata(cfg, step, hash))`:
                        {"tunegraph_format": 1, "kind", "config", "wrapped_module_names", "metadata"}
`adapters.save_adapter_state(adapter, dir, metadata)` writes both. Export needs no model: the file
layout (lycoris_ keys with scalar folded and a full-matrix alpha every reader takes as scale 1, or diffusers transformer. keys with
alpha folded into lora_B) is computed from the raw tensors alone.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..adapters.export import export_state
from ..errors import TrainingError
from ..training.ckpt_manifest import verify

log = logging.getLogger("tunegraph")
COMPLETE_MARKER = "complete"  # written last by training/checkpoint.py


def export_checkpoint(checkpoint_dir: Path, out_file: Path) -> Path:
    """Write `out_file` (ComfyUI-loadable .safetensors) from `checkpoint_dir`; returns its path."""
    checkpoint_dir, out_file = Path(checkpoint_dir), Path(out_file)
    if not checkpoint_dir.is_dir():
        raise TrainingError(f"checkpoint folder '{checkpoint_dir}' does not exist")
    if out_file.suffix != ".safetensors":
        raise TrainingError(f"--out '{out_file}' must end in .safetensors (ComfyUI lists only those)")
    if not (checkpoint_dir / COMPLETE_MARKER).is_file():
        log.warning("%s has no '%s' marker: it may be half-written", checkpoint_dir, COMPLETE_MARKER)
    elif (problem := verify(checkpoint_dir)) is not None:  # never export a damaged adapter
        raise TrainingError(f"checkpoint {checkpoint_dir} is damaged ({problem}); export another checkpoint")
    try:
        return export_state(checkpoint_dir, out_file)
    except OSError as e:
        raise TrainingError(f"cannot write '{out_file}': {e.strerror or e}") from None
