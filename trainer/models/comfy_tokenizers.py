"""Tokenizers from a ComfyUI install the user already has (never a download).

ComfyUI ships the vocabularies its text-encoder loaders use: `comfy/sd1_tokenizer` (CLIP-L and
CLIP-G share it), `comfy/text_encoders/t5_tokenizer` and `comfy/text_encoders/llama_tokenizer`.
Which install: the `comfyui_path` config key, else the ComfyUI this process runs inside (the node
pack), else the `COMFYUI_DIR` environment variable.

Under transformers 5 `LlamaTokenizerFast` re-derives the pre-tokenizer and gives wrong ids for the
Llama 3 vocabulary, so its tokenizer.json is read as a plain fast tokenizer and Llama 3.1
Instruct's special tokens are set here (HiDream pads with eos = <|eot_id|>, as ComfyUI does).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from ..errors import ConfigError

CLIP_MAX_LENGTH = 77
LLAMA_BOS, LLAMA_EOS = "<|begin_of_text|>", "<|eot_id|>"
# kind -> folder inside a ComfyUI install
TOKENIZER_FOLDERS = {
    "clip": "comfy/sd1_tokenizer",
    "t5": "comfy/text_encoders/t5_tokenizer",
    "llama": "comfy/text_encoders/llama_tokenizer",
}
KEY = "comfyui_path"


def running_comfyui() -> Path | None:
    """The ComfyUI this process was started from (its `folder_paths` module is imported), if any."""
    module = sys.modules.get("folder_paths")
    path = getattr(module, "__file__", None)
    return Path(path).resolve().parent if path else None


def comfyui_root(configured: str | None, origin: str) -> Path:
    """The ComfyUI install to take tokenizers from; a clear ConfigError when none is known."""
    if configured:
        root = Path(configured).expanduser()
        if not (root / "comfy").is_dir():
            raise ConfigError(
                f"{origin}: key '{KEY}': {root} is not a ComfyUI install (no comfy/ folder inside). "
                "Set it to the folder that holds ComfyUI's main.py."
            )
        return root
    for root in (
        running_comfyui(),
        Path(os.environ["COMFYUI_DIR"]) if os.environ.get("COMFYUI_DIR") else None,
    ):
        if root is not None and (root / "comfy").is_dir():
            return root
    raise ConfigError(
        f"{origin}: text-encoder files need tokenizers, and no ComfyUI install is known to take them from. "
        f"Set the config key '{KEY}' (or the COMFYUI_DIR environment variable) to your ComfyUI folder, "
        "or set pretrained_model_name_or_path to a diffusers folder that has tokenizer/ folders."
    )


def tokenizer_folder(root: Path, kind: str, origin: str) -> Path:
    folder = root / TOKENIZER_FOLDERS[kind]
    needed = "tokenizer.json" if kind != "clip" else "vocab.json"
    if not (folder / needed).is_file():
        raise ConfigError(
            f"{origin}: key '{KEY}': the {kind} tokenizer is missing from {root} (no {folder / needed}). "
            "Point the key at a complete ComfyUI install (0.3.x or newer)."
        )
    return folder


def load_tokenizer(root: Path, kind: str, origin: str, max_length: int | None = None) -> Any:
    """The `kind` ("clip", "t5" or "llama") tokenizer from a ComfyUI install, offline."""
    from transformers import CLIPTokenizer, PreTrainedTokenizerFast, T5TokenizerFast

    folder = tokenizer_folder(root, kind, origin)
    try:
        if kind == "clip":
            return CLIPTokenizer.from_pretrained(
                str(folder), model_max_length=max_length or CLIP_MAX_LENGTH, local_files_only=True
            )
        if kind == "t5":
            return T5TokenizerFast.from_pretrained(str(folder), local_files_only=True)
        return PreTrainedTokenizerFast(
            tokenizer_file=str(folder / "tokenizer.json"),
            bos_token=LLAMA_BOS,
            eos_token=LLAMA_EOS,
            pad_token=LLAMA_EOS,
            model_max_length=max_length or 131072,
        )
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(
            f"{origin}: key '{KEY}': could not read the {kind} tokenizer in {folder}: {exc}"
        ) from exc
