"""Where paths that arrive through /prompt may point.

A graph can be queued by anyone who reaches the server, so dataset folders, config files and output
folders are confined to ComfyUI's input, output and model folders, plus roots the server owner names
in the environment variable TUNEGRAPH_ALLOWED_ROOTS (os.pathsep-separated absolute folders, e.g.
`/data/datasets:/mnt/loras`). A relative path is taken inside the node's default folder (input for
datasets and configs, output for runs); `..` segments are refused outright, and an absolute path must
lie inside one of the roots. Checks are lexical (after normalisation), so a symlink the owner placed
inside an allowed folder still works.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from ..trainer.errors import ConfigError

ENV_ROOTS = "TUNEGRAPH_ALLOWED_ROOTS"


def env_roots() -> list[Path]:
    raw = os.environ.get(ENV_ROOTS, "")
    return [Path(p).expanduser() for p in raw.split(os.pathsep) if p.strip()]


def _inside(path: Path, root: Path) -> bool:
    root = Path(os.path.normpath(os.path.abspath(root)))
    return path == root or root in path.parents


def confine(value: str | os.PathLike, base: Path, roots: Iterable[Path], what: str) -> Path:
    """The absolute path `value` names (relative ones inside `base`), if it lies inside a root;
    otherwise a ConfigError naming `what`, the value and the allowed folders."""
    text = str(value).strip()
    if not text:
        raise ConfigError(f"{what}: no path given")
    if "\x00" in text:
        raise ConfigError(f"{what}: path contains a NUL character")
    p = Path(text).expanduser()
    if ".." in p.parts:
        raise ConfigError(f"{what}: '{text}' contains '..'; paths may not climb out of their folder")
    full = Path(os.path.normpath(p if p.is_absolute() else Path(base) / p))
    roots = [Path(r) for r in roots]
    if not any(_inside(full, r) for r in roots):
        allowed = ", ".join(str(r) for r in roots)
        raise ConfigError(
            f"{what}: '{text}' is outside the folders this server allows ({allowed}). Put it under "
            f"ComfyUI's input/output/models folders, or have the server owner add its folder to {ENV_ROOTS}."
        )
    return full


def comfy_roots() -> list[Path]:
    """ComfyUI's input, output, temp and every model folder, plus TUNEGRAPH_ALLOWED_ROOTS."""
    import folder_paths

    roots = [Path(folder_paths.get_input_directory()), Path(folder_paths.get_output_directory())]
    roots.append(Path(folder_paths.models_dir))
    for paths, _ in folder_paths.folder_names_and_paths.values():
        roots.extend(Path(p) for p in paths if "custom_nodes" not in Path(p).parts)
    return roots + env_roots()


def input_path(value: str, what: str) -> Path:
    """A dataset folder or config file: relative to ComfyUI's input folder."""
    import folder_paths

    return confine(value, Path(folder_paths.get_input_directory()), comfy_roots(), what)


def output_path(value: str, what: str) -> Path:
    """A run folder: relative to ComfyUI's output folder."""
    import folder_paths

    return confine(value, Path(folder_paths.get_output_directory()), comfy_roots(), what)


def output_dir() -> Path:
    import folder_paths

    return Path(folder_paths.get_output_directory())


def loras_dir() -> Path:
    """The first models/loras folder (where SaveAdapter writes)."""
    import folder_paths

    return Path(folder_paths.get_folder_paths("loras")[0])
