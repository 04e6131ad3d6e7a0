"""Finding images and captions; every bad file is skipped with a reason; unusable folders are errors."""

import hashlib
from pathlib import Path

import pytest
from PIL import Image

from tunegraph.trainer.data.backends import DatasetSpec
from tunegraph.trainer.data.demo import make_demo_dataset
from tunegraph.trainer.data.discovery import discover
from tunegraph.trainer.errors import DatasetError


def spec(folder, **kw):
    return DatasetSpec(id="ds", instance_data_dir=Path(folder), source="m.json", **kw)


def png(path, size=(96, 96), colour=(200, 10, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def test_filename_captions_turn_underscores_into_spaces(tmp_path):
    png(tmp_path / "a_red_circle.png")
    png(tmp_path / "sub" / "two_dogs (1).jpg")
    found = discover(spec(tmp_path))
    # as SimpleTuner: underscores to spaces, nothing stripped
    assert [r.captions for r in found.records] == [("a red circle",), ("two dogs (1)",)]
    assert found.found == 2 and found.skipped == []


def test_textfile_captions_one_per_line_unless_multiline_split_disabled(tmp_path):
    png(tmp_path / "x.png")
    (tmp_path / "x.txt").write_text("first caption\n\nsecond caption\n")
    assert discover(spec(tmp_path, caption_strategy="textfile")).records[0].captions == (
        "first caption",
        "second caption",
    )
    joined = discover(spec(tmp_path, caption_strategy="textfile", disable_multiline_split=True)).records[0]
    assert joined.captions == ("first caption\n\nsecond caption",)


def test_instance_prompt_and_prepend(tmp_path):
    png(tmp_path / "a_cat.png")
    only = discover(spec(tmp_path, caption_strategy="instanceprompt", instance_prompt="sks")).records[0]
    assert only.captions == ("sks",)
    pre = discover(spec(tmp_path, instance_prompt="sks", prepend_instance_prompt=True)).records[0]
    assert pre.captions == ("sks a cat",)


def test_records_carry_size_and_content_hash(tmp_path):
    p = png(tmp_path / "a.png", size=(120, 80))
    (r,) = discover(spec(tmp_path)).records
    assert r.size == (120, 80) and r.content_hash == hashlib.sha256(p.read_bytes()).hexdigest()


def test_exif_rotation_swaps_the_size(tmp_path):
    img = Image.new("RGB", (120, 80))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90: displayed 80x120
    img.save(tmp_path / "r.jpg", exif=exif)
    assert discover(spec(tmp_path)).records[0].size == (80, 120)


def test_bad_files_are_skipped_counted_and_listed_with_reasons(tmp_path):
    for name in ("good1", "good2", "small", "nocap"):
        png(tmp_path / f"{name}.png", size=(40, 40) if name == "small" else (96, 96))
    for name in ("good1", "good2", "small"):
        (tmp_path / f"{name}.txt").write_text(f"caption {name}")
    (tmp_path / "corrupt.png").write_bytes(b"this is not a png at all")
    data = (tmp_path / "good1.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "truncated.txt").write_text("t")
    (tmp_path / "notes.pdf").write_bytes(b"%PDF-1.4")
    (tmp_path / "meta.json").write_text("{}")  # companion file: ignored, not "skipped"
    (tmp_path / ".hidden.png").write_bytes(b"x")  # hidden: ignored
    found = discover(spec(tmp_path, caption_strategy="textfile", minimum_image_size=64))
    assert [r.path.name for r in found.records] == ["good1.png", "good2.png"]
    reasons = {Path(s["path"]).name: s["reason"] for s in found.skipped}
    assert set(reasons) == {"corrupt.png", "truncated.png", "notes.pdf", "small.png", "nocap.png"}
    assert "corrupt" in reasons["corrupt.png"] and "corrupt" in reasons["truncated.png"]
    assert reasons["notes.pdf"] == "not an image file (.pdf)"
    assert "40x40 is below minimum_image_size 64" in reasons["small.png"]
    assert reasons["nocap.png"] == "missing caption file nocap.txt (caption_strategy textfile)"
    assert found.found == len(found.records) + len(found.skipped) == 7


def test_empty_folder_is_an_error_naming_dataset_and_path(tmp_path):
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(DatasetError, match=rf"m.json: dataset 'ds': no images .* in {tmp_path}"):
        discover(spec(tmp_path))


def test_missing_folder_is_an_error_naming_every_tried_path(tmp_path):
    s = DatasetSpec(
        id="ds", instance_data_dir=tmp_path / "gone", tried_dirs=(tmp_path / "gone", Path("/x/gone"))
    )
    with pytest.raises(DatasetError) as e:
        discover(s)
    assert "'ds'" in str(e.value) and str(tmp_path / "gone") in str(e.value) and "/x/gone" in str(e.value)


def test_a_file_given_as_the_folder_is_an_error(tmp_path):
    png(tmp_path / "one.png")
    with pytest.raises(DatasetError, match="is a file, not a folder"):
        discover(spec(tmp_path / "one.png"))


def test_folder_with_only_bad_files_is_an_error_listing_reasons(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"junk")
    with pytest.raises(DatasetError, match=r"none of the 1 files .*\(bad.png: unreadable"):
        discover(spec(tmp_path))


def test_demo_dataset_is_deterministic_with_captions(tmp_path):
    a = make_demo_dataset(tmp_path / "a", n=4, size=(64, 48), seed=3)
    b = make_demo_dataset(tmp_path / "b", n=4, size=(64, 48), seed=3)
    files = sorted(p.name for p in a.iterdir())
    assert files == [f"demo_{i:03d}.{e}" for i in range(4) for e in ("png", "txt")]
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    caption = (a / "demo_000.txt").read_text().strip()
    assert caption.startswith(("a ", "an ")) and caption.split()[2] in ("circle", "square", "triangle")
    assert caption.endswith("background")
    with Image.open(a / "demo_001.png") as img:
        assert img.size == (64, 48) and len(img.getcolors()) >= 2  # a shape on a background
    found = discover(spec(a, caption_strategy="textfile"))
    assert len(found.records) == 4 and len({r.captions for r in found.records}) == 4  # captions are unique
    many = make_demo_dataset(tmp_path / "many", n=40, size=(8, 8))
    assert len({p.read_text() for p in many.glob("*.txt")}) == 40


def test_a_second_discovery_reads_no_image_again_until_one_changes(tmp_path):
    from tunegraph.trainer.data.discovery import _hash_of

    for i in range(3):
        png(tmp_path / f"img_{i}.png", colour=(10 * i, 0, 0))
    before = _hash_of.cache_info().misses
    first = discover(spec(tmp_path))
    assert _hash_of.cache_info().misses - before == 3  # preflight's pass hashes each image once
    again = discover(spec(tmp_path))
    assert _hash_of.cache_info().misses - before == 3  # caching's pass reads none of them again
    assert [r.content_hash for r in again.records] == [r.content_hash for r in first.records]
    edited = png(tmp_path / "img_1.png", colour=(0, 0, 255))  # same name and size, new content
    third = discover(spec(tmp_path))
    assert third.records[1].content_hash == hashlib.sha256(edited.read_bytes()).hexdigest()
    assert third.records[1].content_hash != first.records[1].content_hash
    assert third.records[0].content_hash == first.records[0].content_hash
