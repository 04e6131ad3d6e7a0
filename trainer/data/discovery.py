"""Find a dataset's images and captions. Bad files are skipped with a reason, never fatal.

Captions follow SimpleTuner: `filename` uses the file stem with underscores turned into spaces (that
is all SimpleTuner does: no suffix stripping); `textfile` reads `<stem>.txt` beside the image, one
caption per non-empty line unless `disable_multiline_split`; `instanceprompt` uses instance_prompt.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from PIL import Image

from ..errors import DatasetError
from .backends import DatasetSpec
from .buckets import too_small

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# Companion files a dataset folder normally holds: neither images nor worth a "skipped" line.
COMPANION_EXTS = (".txt", ".json", ".jsonl", ".csv", ".parquet", ".md", ".caption", ".yaml", ".yml")
_ROTATED = (5, 6, 7, 8)
log = logging.getLogger("tunegraph")  # EXIF orientations that swap width and height


@dataclass(frozen=True)
class ImageRecord:
    path: Path
    size: tuple[int, int]  # (W, H) after EXIF rotation
    content_hash: str  # sha256 of the file bytes
    captions: tuple[str, ...]


@dataclass
class Discovery:
    spec: DatasetSpec
    records: list[ImageRecord]
    found: int
    skipped: list[dict] = field(default_factory=list)

    def skip(self, path: Path, reason: str) -> None:
        self.skipped.append({"path": readable(str(path)), "reason": reason})


def readable(text: str) -> str:
    """A file name as valid text: bytes that were not UTF-8 (kept by Python as surrogates) become U+FFFD."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@lru_cache(maxsize=1 << 17)
def _hash_of(path: str, dev: int, ino: int, size: int, mtime_ns: int, ctime_ns: int) -> str:
    return file_hash(Path(path))


def image_hash(path: Path) -> str:
    """file_hash, read once per process while the file is unchanged: preflight and caching both
    discover the dataset, and a ComfyUI server re-discovers it per queued run. Any write changes
    ctime (which no user tool can set back), so an edited image is hashed again."""
    st = path.stat()
    return _hash_of(str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def walk_files(folder: Path) -> list[Path]:
    """Files under folder, following links to folders, but each real folder once: a symlink loop (or a
    second link to the same folder) is walked once, with one warning, instead of ~40 times."""
    out, seen = [], set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        st = os.stat(root)
        if (st.st_dev, st.st_ino) in seen:
            log.warning("%s: a link back to a folder already read (symlink loop?); skipped", readable(root))
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out += [Path(root) / f for f in sorted(files) if not f.startswith(".")]
    return out


def _not_regular(path: Path) -> str | None:
    """Why `path` must not be opened (a FIFO would block forever, a device never ends), or None."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        return f"cannot be read ({e.strerror}; a broken link?)"
    return None if stat.S_ISREG(mode) else "not a regular file (a pipe, device or socket)"


def read_size(path: Path) -> tuple[int, int]:
    """Header size (EXIF rotation applied); raises on unreadable or corrupt (PNG CRC) files."""
    with Image.open(path) as img:
        w, h = img.size
        rotated = img.getexif().get(0x0112) in _ROTATED
    with Image.open(path) as img:
        img.verify()  # checks structure/CRCs without decoding pixels; decoding errors surface later
    return (h, w) if rotated else (w, h)


def captions_for(path: Path, spec: DatasetSpec) -> tuple[str, ...]:
    """Captions for one image; raises DatasetError with the skip reason when there are none."""
    if spec.caption_strategy == "instanceprompt":
        return (spec.instance_prompt,)
    if spec.caption_strategy == "filename":
        found = [readable(path.stem).replace("_", " ").strip()]
    else:
        txt = path.with_suffix(".txt")
        if not txt.is_file():
            raise DatasetError(f"missing caption file {txt.name} (caption_strategy textfile)")
        text = txt.read_text(encoding="utf-8", errors="replace").strip()
        found = [text] if spec.disable_multiline_split else [ln.strip() for ln in text.splitlines()]
        found = [c for c in found if c]
        if not found:
            raise DatasetError(f"empty caption file {txt.name}")
    if spec.prepend_instance_prompt:
        found = [f"{spec.instance_prompt} {c}" for c in found]
    return tuple(found)


def _missing_folder(spec: DatasetSpec) -> DatasetError:
    tried = " and ".join(str(p) for p in spec.tried_dirs) or str(spec.instance_data_dir)
    return DatasetError(
        f"{spec.source}: dataset '{spec.id}': instance_data_dir '{spec.instance_data_dir}' does not exist "
        f"(tried {tried}); fix the path or set disabled: true"
    )


def discover(spec: DatasetSpec) -> Discovery:
    """Every usable image under instance_data_dir (recursive, sorted), plus what was skipped and why."""
    folder = spec.instance_data_dir
    if folder.exists() and not folder.is_dir():
        raise DatasetError(
            f"{spec.source}: dataset '{spec.id}': instance_data_dir {folder} is a file, not a folder"
        )
    if not folder.is_dir():
        raise _missing_folder(spec)
    result = Discovery(spec, [], 0)
    for path in walk_files(folder):
        ext = path.suffix.lower()
        if ext in COMPANION_EXTS:
            continue
        result.found += 1
        if ext not in IMAGE_EXTS:
            result.skip(path, f"not an image file ({readable(ext) or 'no extension'})")
            continue
        problem = _not_regular(path)
        if problem is not None:
            result.skip(path, problem)
            continue
        try:
            size = read_size(path)
        except Exception as e:  # PIL raises many types for bad files; none may stop the run
            result.skip(path, f"unreadable or corrupt image: {e}")
            continue
        if too_small(size, spec):
            unit = {"pixel": "shorter edge", "area": "megapixels", "pixel_area": "sqrt(area)"}[
                spec.resolution_type
            ]
            result.skip(
                path, f"{size[0]}x{size[1]} is below minimum_image_size {spec.minimum_image_size:g} ({unit})"
            )
            continue
        try:
            captions = captions_for(path, spec)
        except DatasetError as e:
            result.skip(path, str(e))
            continue
        result.records.append(ImageRecord(path, size, image_hash(path), captions))
    if result.found == 0:
        raise DatasetError(
            f"{spec.source}: dataset '{spec.id}': no images ({' '.join(IMAGE_EXTS)}) in {folder}; "
            "add images or set disabled: true"
        )
    if not result.records:
        reasons = "; ".join(f"{Path(s['path']).name}: {s['reason']}" for s in result.skipped[:5])
        raise DatasetError(
            f"{spec.source}: dataset '{spec.id}': none of the {result.found} files in {folder} is usable ({reasons})"
        )
    return result
