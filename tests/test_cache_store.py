"""Content keys and atomic safetensors writes."""

import torch

from tunegraph.trainer.cache.store import (
    atomic_write,
    content_key,
    entry_path,
    is_valid,
    load_tensors,
    save_tensors,
)


def test_content_key_changes_with_every_part_and_ignores_order():
    base = content_key("latents", image="abc", box=(0, 0, 64, 64), vae="v1")
    assert base == content_key("latents", vae="v1", box=(0, 0, 64, 64), image="abc")
    assert len({base, content_key("latents", image="abd", box=(0, 0, 64, 64), vae="v1"),
                content_key("latents", image="abc", box=(1, 0, 65, 64), vae="v1"),
                content_key("latents", image="abc", box=(0, 0, 64, 64), vae="v2"),
                content_key("text", image="abc", box=(0, 0, 64, 64), vae="v1")}) == 5  # fmt: skip


def test_save_and_load_round_trip_a_row_of_a_batch(tmp_path):
    batch = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    path = entry_path(tmp_path / "c", "k")
    save_tensors(path, {"latents": batch[1]}, {"kind": "latents"})  # a view sharing the batch storage
    assert path == tmp_path / "c" / "k.safetensors" and is_valid(path)
    assert torch.equal(load_tensors(path)["latents"], batch[1])


def test_failed_write_leaves_no_file_and_keeps_the_old_entry(tmp_path):
    path = tmp_path / "entry.safetensors"

    def half_then_fail(tmp):
        tmp.write_bytes(b"partial bytes")
        raise OSError("disk full")

    try:
        atomic_write(path, half_then_fail)
    except OSError:
        pass
    assert list(tmp_path.iterdir()) == []  # neither the entry nor a temp file
    save_tensors(path, {"x": torch.ones(2)})
    try:
        atomic_write(path, half_then_fail)
    except OSError:
        pass
    assert [p.name for p in tmp_path.iterdir()] == ["entry.safetensors"]
    assert torch.equal(load_tensors(path)["x"], torch.ones(2))


def test_is_valid_rejects_missing_and_damaged_files(tmp_path):
    assert not is_valid(tmp_path / "none.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 5)
    assert not is_valid(bad)
