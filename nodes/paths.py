"""Where paths that arrive through /prompt may point.

A graph can be queued by anyone who reaches the server, so dataset folders, config files and output
folders are confined to ComfyUI's input, output and model folders, plus roots the server owner names
in the environment variable TUNEGRAPH_ALLOWED_ROOTS (os.pathsep-separated absolute folders, e.g.
`/data/datasets:/mnt/loras`). A relative path is taken inside the node's default folder (input for
datasets and configs, output for runs); `..` segments are refused outright, and an absolute path must
lie inside one of the roots, both as written and with symlinks resolved: a link inside input/ to a
folder elsewhere is refused (the server owner adds its target to TUNEGRAPH_ALLOWED_ROOTS instead).
`{env:NAME}` in a path is filled before it is checked; `{model_family}` / `{output_dir}` / `{id}`
stay as written and are filled later with values that cannot climb (a family name, the confined run
folder, a plain dataset id).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from ..trainer.data.path_variables import fill_string
from ..trainer.errors import ConfigError

ENV_ROOTS = "TUNEGRAPH_ALLOWED_ROOTS"


def env_roots() -> list[Path]:
    raw = os.environ.get(ENV_ROOTS, "")
    return [Path(p).expanduser() for p in raw.split(os.pathsep) if p.strip()]


MAX_PATH_BYTES = 4096  # PATH_MAX; longer values are refused before any file-system call


def _inside(path: Path, root: Path) -> bool:
    root = Path(os.path.normpath(os.path.abspath(root)))
    return path == root or root in path.parents


def _inside_real(real: Path, roots: list[Path]) -> bool:
    return any(_inside(real, Path(os.path.realpath(r))) for r in roots)


def _check_length(text: str, what: str) -> None:
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(f"{what}: path is not valid text (UTF-8)") from None
    if len(data) > MAX_PATH_BYTES or any(len(part) > 255 for part in data.split(b"/")):
        raise ConfigError(f"{what}: path is too long ({len(data)} bytes, or a name over 255 bytes)")


def confine(value: str | os.PathLike, base: Path, roots: Iterable[Path], what: str) -> Path:
    """The absolute path `value` names (relative ones inside `base`), if it lies inside a root;
    otherwise a ConfigError naming `what`, the value and the allowed folders. SimpleTuner's `{env:NAME}`
    is filled first (the trainer would fill it later), so the path checked is the path used."""
    text = fill_string(str(value), {}).strip()
    if not text:
        raise ConfigError(f"{what}: no path given")
    if "\x00" in text:
        raise ConfigError(f"{what}: path contains a NUL character")
    _check_length(text, what)
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
    real = Path(os.path.realpath(full))
    if real != full and not _inside_real(real, roots):
        raise ConfigError(
            f"{what}: '{text}' is a link to {real}, which is outside the folders this server allows; "
            f"have the server owner add {real} to {ENV_ROOTS}, or copy the files into ComfyUI's input folder."
        )
    return full


def check_dataset_files(folder: str | os.PathLike, what: str) -> None:
    """Every file a dataset folder holds (as discovery walks it, links followed) really lies inside
    the allowed folders: a link inside a confined folder to a file elsewhere would otherwise be read
    and trained on. Checked where a graph's training reads the folder, so files added later count."""
    from ..trainer.data.discovery import walk_files

    roots = comfy_roots()
    if not Path(folder).is_dir():
        return  # discovery names a missing folder itself
    for path in walk_files(Path(folder)):
        real = Path(os.path.realpath(path))
        if real != path and not _inside_real(real, roots):
            raise ConfigError(
                f"{what}: {path} is a link to {real}, which is outside the folders this server allows; "
                f"copy the file into the dataset folder, or have the server owner add its folder to {ENV_ROOTS}."
            )


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


RESERVED_RUN_NAMES = ("cache",)  # output/tunegraph/cache holds the shared latent / text caches


def run_folder(name: str, what: str) -> Path:
    """output/tunegraph/<name> for a plain run name (issue 18): no separators, not empty or `.`, not
    the shared cache folder, so one run folder never contains or lies inside another."""
    from ..trainer.names import plain_name

    clean = plain_name(str(name).strip(), what)
    if clean.lower() in RESERVED_RUN_NAMES:
        raise ConfigError(
            f"{what}: '{clean}' is reserved for TuneGraph's shared cache folder; choose another"
        )
    return output_path(str(Path("tunegraph") / clean), what)
