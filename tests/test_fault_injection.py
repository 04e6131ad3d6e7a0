"""Fault injection on tiny runs: corrupt what TuneGraph reads back, kill it, feed it bad values.

Every fault must end one of three ways: held (the result equals the clean run's), recomputed (a bad
cache entry is rebuilt, with one warning naming it) or refused (one `error:` line, exit 2, no
traceback). Never rc 0 with a result that differs from the clean run. The counts are printed at the
end (`pytest -s`) and written to tests/artifacts/fault_injection.json.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from tunegraph.trainer import cli
from tunegraph.trainer.cache.store import entry_problem, save_tensors
from tunegraph.trainer.commands.demo import write_demo_config
from tunegraph.trainer.commands.export import export_checkpoint
from tunegraph.trainer.config import load_config
from tunegraph.trainer.errors import TrainingError
from tunegraph.trainer.training.checkpoint import resolve_resume
from tunegraph.trainer.training.loop import train

STEPS = 6
QUIET = {"validation_prompt": None, "eval_steps_interval": None, "report_to": "none"}
# vae_batch_size 1: a VAE encodes a batch of 4 and 4 batches of 1 to ~1e-6 apart, so only then is a
# recomputed latent bit-identical to the one it replaces
RUN = {
    **QUIET,
    "vae_batch_size": 1,
    "max_train_steps": STEPS,
    "checkpoint_step_interval": 1,
    "checkpoints_total_limit": None,
}
FINAL = "pytorch_lora_weights.safetensors"
COUNTS: Counter = Counter()
ARTIFACT = Path(__file__).parent / "artifacts" / "fault_injection.json"


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    line = ", ".join(f"{k} {COUNTS[k]}" for k in ("injected", "held", "recomputed", "refused"))
    print(f"\nfault injection: {line}")
    ARTIFACT.parent.mkdir(exist_ok=True)
    ARTIFACT.write_text(json.dumps(dict(COUNTS), indent=2))


def outcome(kind: str, n: int = 1) -> None:
    COUNTS["injected"] += n
    COUNTS[kind] += n


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return write_demo_config(tmp_path_factory.mktemp("faults"), steps=STEPS)


def cfg(demo: Path, out: Path, **keys):
    return load_config(demo, {**RUN, "output_dir": str(out), **keys})


@pytest.fixture(scope="module")
def clean(demo: Path) -> Path:
    """The uninterrupted run every faulty one is compared with (checkpoints at steps 1..7)."""
    out = demo.parent.parent / "clean"
    train(cfg(demo, out), progress=False)
    return out


def final(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / FINAL))


def assert_same_as_clean(out: Path, clean: Path) -> None:
    a, b = final(out), final(clean)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def copy_run(clean: Path, dest: Path) -> Path:
    shutil.copytree(clean, dest)
    for name in (FINAL, "loss.png"):
        (dest / name).unlink()
    return dest


def flip_bit(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    at = len(data) - 9 if offset is None else offset  # inside the last tensor's bytes by default
    data[at] ^= 0x40
    path.write_bytes(bytes(data))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# -- checkpoints ----------------------------------------------------------------------------------


def _damage(run: Path, fault: str) -> None:
    newest = run / f"checkpoint-{STEPS - 1}"
    if fault == "bitflip_adapter":
        flip_bit(newest / "adapter.safetensors")
    elif fault == "bitflip_optimizer":
        flip_bit(newest / "optimizer.pt", offset=(newest / "optimizer.pt").stat().st_size // 2)
    elif fault == "truncated_rng":
        (newest / "rng.pt").write_bytes((newest / "rng.pt").read_bytes()[:100])
    elif fault == "torn_marker":
        (newest / "complete").write_text('{"step": 5, "fi')
    elif fault == "empty_marker":
        (newest / "complete").write_text("")
    elif fault == "rotation_killed":  # limit 1 + SIGTERM at a checkpoint step + SIGKILL mid-overwrite
        for old in run.glob("checkpoint-*"):
            if old != newest:
                shutil.rmtree(old)
        newest.rename(run / f".checkpoint-{STEPS - 1}.old-{_dead_pid()}")
        (run / f".checkpoint-{STEPS - 1}.tmp-{_dead_pid()}").mkdir()


@pytest.mark.parametrize("fault", ["bitflip_adapter", "truncated_rng", "torn_marker", "empty_marker"])
def test_latest_skips_a_damaged_checkpoint(clean, tmp_path, caplog, fault):
    run = copy_run(clean, tmp_path / "run")
    _damage(run, fault)
    with caplog.at_level(logging.WARNING, logger="tunegraph"):
        assert resolve_resume(run, "latest") == run / f"checkpoint-{STEPS - 2}"
    if fault not in ("torn_marker", "empty_marker"):  # a marker that does not parse = never finished
        assert f"checkpoint-{STEPS - 1} is damaged" in caplog.text
    outcome("held")


@pytest.mark.parametrize("fault", ["bitflip_optimizer", "rotation_killed"])
def test_resume_from_the_newest_verified_checkpoint_matches_the_clean_run(
    demo, clean, tmp_path, caplog, fault
):
    run = copy_run(clean, tmp_path / "run")
    _damage(run, fault)
    with caplog.at_level(logging.WARNING, logger="tunegraph"):
        summary = train(cfg(demo, run, resume_from_checkpoint="latest"), progress=False)
    expected = STEPS - 1 if fault == "rotation_killed" else STEPS - 2  # the .old copy is put back
    assert summary["resumed_from"] == str(run / f"checkpoint-{expected}")
    assert_same_as_clean(run, clean)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert sorted(x["step"] for x in lines if "loss" in x) == list(range(1, STEPS + 1))
    outcome("held")


def test_a_named_damaged_checkpoint_and_all_damaged_are_refused(demo, clean, tmp_path):
    run = copy_run(clean, tmp_path / "run")
    flip_bit(run / "checkpoint-5" / "adapter.safetensors")
    with pytest.raises(TrainingError, match=r"checkpoint-5.*damaged.*adapter.safetensors.*sha256"):
        train(cfg(demo, run, resume_from_checkpoint="checkpoint-5"), progress=False)
    outcome("refused")
    with pytest.raises(TrainingError, match="damaged.*export another"):
        export_checkpoint(run / "checkpoint-5", tmp_path / "out.safetensors")
    outcome("refused")
    for ckpt in run.glob("checkpoint-*"):
        (ckpt / "complete").write_text("{")
    with pytest.raises(TrainingError, match="none verifies.*Not restarting from step 0"):
        train(cfg(demo, run, resume_from_checkpoint="latest"), progress=False)
    assert not (run / FINAL).exists() and len((run / "metrics.jsonl").read_text().splitlines()) >= STEPS
    outcome("refused")


def test_sigkill_at_a_random_moment_then_resume_matches_the_clean_run(demo, clean, tmp_path):
    seed = int(os.environ.get("FAULT_SEED", time.time_ns() % 10_000))
    delay = random.Random(seed).uniform(0.0, 1.5)
    out = tmp_path / "killed"
    args = [sys.executable, "-m", "tunegraph.trainer.cli", "train", "--config", str(demo)]
    sets = [f"{k}={'none' if v is None else v}" for k, v in {**RUN, "output_dir": str(out)}.items()]
    cmd = args + [x for kv in sets for x in ("--set", kv)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not list(out.glob("checkpoint-*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(delay)  # then anywhere in training or in a checkpoint write
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = cli.main([*cmd[3:], "--set", "resume_from_checkpoint=latest"])
    assert resumed == 0, f"seed {seed}"
    assert_same_as_clean(out, clean)
    outcome("held")


# -- cache entries ---------------------------------------------------------------------------------


def test_bad_cache_entries_are_recomputed_with_one_warning_each(demo, clean, tmp_path, caplog):
    latents = sorted((demo.parent.parent / "cache" / "vae" / "demo-shapes").glob("*.safetensors"))
    texts = sorted((demo.parent.parent / "cache" / "text").glob("*.safetensors"))
    flip_bit(latents[0])  # a flipped exponent bit: plausible numbers, wrong ones
    good = load_file(str(latents[1]))["latents"]
    save_file({"latents": torch.zeros(good.shape[0], 4, 4)}, str(latents[1]))  # a valid file, wrong shape
    save_tensors(latents[2], {"latents": torch.full_like(good, float("nan"))})  # NaN, hash consistent
    save_tensors(latents[3], {"latents": torch.zeros(good.shape[0], 2, 2)})  # wrong shape, hash consistent
    latents[4].write_bytes(latents[4].read_bytes()[:50])  # truncated
    flip_bit(texts[0])
    bad = [latents[i] for i in range(5)] + [texts[0]]
    with caplog.at_level(logging.WARNING, logger="tunegraph"):
        train(cfg(demo, tmp_path / "run"), progress=False)
    warned = [r.getMessage() for r in caplog.records if "recomputing" in r.getMessage()]
    assert sorted(w.split()[2] for w in warned) == sorted(str(p) for p in bad)
    assert all(entry_problem(p) is None for p in bad)
    assert_same_as_clean(tmp_path / "run", clean)
    outcome("recomputed", len(bad))


# -- metrics.jsonl ----------------------------------------------------------------------------------


def test_damaged_metrics_lines_are_skipped_and_repaired_on_resume(demo, clean, tmp_path, caplog):
    run = copy_run(clean, tmp_path / "run")
    metrics = run / "metrics.jsonl"
    junk = [b"\xff\xfe not utf-8", b"[1, 2]", b'{"step": "x", "loss": 1}', b'{"step": 3.5}', b"foreign text"]
    metrics.write_bytes(metrics.read_bytes() + b"\n".join(junk) + b'\n{"step": 7, "lo')
    with caplog.at_level(logging.WARNING, logger="tunegraph"):
        train(cfg(demo, run, resume_from_checkpoint="latest"), progress=False)
    assert "6 line(s) are not metric records; skipped" in caplog.text
    records = [json.loads(x) for x in metrics.read_text(encoding="utf-8").splitlines()]
    assert sorted(r["step"] for r in records if "loss" in r) == list(range(1, STEPS + 1))
    assert_same_as_clean(run, clean)
    outcome("held", len(junk) + 1)
    shutil.rmtree(run / f"checkpoint-{STEPS - 1}")
    metrics.unlink()
    metrics.mkdir()
    (run / FINAL).unlink()
    with pytest.raises(TrainingError, match="metrics.jsonl is not a file"):
        train(cfg(demo, run, resume_from_checkpoint="latest"), progress=False)
    outcome("refused")


# -- bad values and files: one error line, exit 2, never a traceback ---------------------------------

BAD_SETS = [
    "validation_steps=0",
    "learning_rate=NaN",
    "seed=1e400",
    "max_train_steps=NaN",
    "max_train_steps=-5",
    "resolution=0",
    "resolution=65536",
    "lr_warmup_steps=-1",
    "max_grad_norm=-1",
    "caption_dropout_probability=2",
    "validation_num_inference_steps=0",
]


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    """cli.main in this process (the real command line's code path): rc, stdout, stderr."""
    try:
        rc = cli.main(list(args))
    except SystemExit as e:  # argparse usage errors
        rc = e.code
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return rc, out, err


@pytest.mark.parametrize("bad", BAD_SETS)
def test_meaningless_values_are_refused_before_loading(demo, tmp_path, capsys, bad):
    rc, _, err = _cli(capsys, "train", "--config", str(demo), "--set", f"output_dir={tmp_path}", "--set", bad)
    assert rc == 2 and f"key '{bad.split('=')[0]}'" in err and err.startswith("error: ")
    assert not (tmp_path / "metrics.jsonl").exists()
    outcome("refused")


def test_set_without_equals_is_a_usage_error(demo, capsys):
    rc, _, err = _cli(capsys, "train", "--config", str(demo), "--set", "learning_rate")
    assert rc == 2 and "expected KEY=VALUE" in err
    outcome("refused")


NON_ASCII = {
    "config.json": ("tracker_run_name", "caf\u00e9"),
    "multidatabackend.json": ("instance_prompt", "caf\u00e9"),
}


@pytest.mark.parametrize(
    ("encoding", "message"), [("utf-16", "UTF-16"), ("utf-16-le", "UTF-16"), ("latin-1", "not valid UTF-8")]
)
@pytest.mark.parametrize("name", ["config.json", "multidatabackend.json"])
def test_config_files_not_in_utf8_name_file_and_encoding(demo, tmp_path, capsys, encoding, message, name):
    conf = tmp_path / "config"
    shutil.copytree(demo.parent, conf)
    data = json.loads((conf / name).read_text())
    key, value = NON_ASCII[name]
    (data if isinstance(data, dict) else data[0])[key] = value
    (conf / name).write_bytes(json.dumps(data, ensure_ascii=False).encode(encoding))
    rc, _, err = _cli(capsys, "cache", "--config", str(conf / "config.json"))
    assert rc == 2 and err.startswith(f"error: {conf / name}") and message in err, err
    outcome("refused")


# -- datasets: nothing hangs, nothing multiplies --------------------------------------------------


def _dataset_copy(demo: Path, tmp_path: Path) -> Path:
    conf = tmp_path / "config"
    shutil.copytree(demo.parent, conf)
    data = tmp_path / "data"
    shutil.copytree(demo.parent.parent / "data", data)
    backends = json.loads((conf / "multidatabackend.json").read_text())
    backends[0].update(instance_data_dir=str(data), cache_dir_vae=str(tmp_path / "vae"))
    (conf / "multidatabackend.json").write_text(json.dumps(backends))
    return conf / "config.json"


def test_fifo_symlink_loop_and_non_utf8_names_neither_hang_nor_multiply(demo, tmp_path, capsys):
    config = _dataset_copy(demo, tmp_path)
    data = tmp_path / "data"
    os.mkfifo(data / "x.png")  # opening it would block forever
    (data / "loop").symlink_to(data, target_is_directory=True)  # os.walk would follow it ~40 deep
    first = sorted(data.glob("*.png"))[0]
    odd = os.path.join(os.fsencode(data), b"caf\xe9_shape.png")  # a Latin-1 name: not valid UTF-8
    shutil.copyfile(first, odd)
    shutil.copyfile(first.with_suffix(".txt"), odd[:-4] + b".txt")
    rc, out, err = _cli(capsys, "cache", "--json", "--config", str(config))
    assert rc == 0, err
    report = json.loads(out.splitlines()[-1])["datasets"][0]
    assert report["images_used"] == 9  # the 8 images + the odd name, each once
    assert any(s["path"].endswith("x.png") and "not a regular file" in s["reason"] for s in report["skipped"])
    outcome("held", 3)


def test_every_image_undecodable_is_an_error_not_a_hang(demo, tmp_path, capsys):
    config = _dataset_copy(demo, tmp_path)
    for png in sorted((tmp_path / "data").glob("*.png")):  # half-downloaded JPEGs: the header reads,
        jpg = png.with_suffix(".jpg")  # the pixels do not (PNGs would already fail discovery's check)
        Image.open(png).convert("RGB").save(jpg, quality=95)
        png.unlink()
        jpg.write_bytes(jpg.read_bytes()[:-400])
    signal.alarm(60)
    try:
        rc, _, err = _cli(capsys, "cache", "--config", str(config))
    finally:
        signal.alarm(0)
    assert rc == 2 and "none of its 8 files is usable" in err and "demo-shapes" in err
    outcome("refused")


def test_absurd_dataset_resolution_is_refused_before_encoding(demo, tmp_path, capsys):
    config = _dataset_copy(demo, tmp_path)
    backends = json.loads((config.parent / "multidatabackend.json").read_text())
    backends[0].update(resolution=1024, resolution_type="area")  # 1024 megapixels: 32000 px edges
    (config.parent / "multidatabackend.json").write_text(json.dumps(backends))
    rc, _, err = _cli(capsys, "cache", "--config", str(config))
    assert rc == 2 and "makes 32000 px buckets" in err and not (tmp_path / "vae").exists()
    outcome("refused")


def test_disk_full_while_caching_is_one_error_and_keeps_what_was_written(demo, tmp_path, capsys):
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    config = _dataset_copy(demo, tmp_path)
    full = tmp_path / "vae"
    full.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=24k", "tmpfs", str(full)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        rc, _, err = _cli(capsys, "cache", "--config", str(config))
        lines = [x for x in err.splitlines() if x.startswith("error:")]
        assert rc == 2 and len(lines) == 1 and str(full) in lines[0] and "MiB more are needed" in lines[0]
        written = list(full.glob("*.safetensors"))
        assert written and all(entry_problem(p) is None for p in written)
        assert not list(full.glob(".*.tmp"))
    finally:
        subprocess.run(["umount", str(full)], check=True)
    outcome("refused")


def test_a_failed_overwrite_puts_the_old_checkpoint_back(tmp_path, monkeypatch):
    from tunegraph.trainer.training import checkpoint as ck

    ck.save_checkpoint(tmp_path, 3, tensors={"adapter.safetensors": {"w": torch.ones(2)}})
    real = os.replace

    def fail_on_publish(src, dst):
        if ".tmp-" in str(src):
            raise OSError(5, "I/O error")
        return real(src, dst)

    monkeypatch.setattr(ck.os, "replace", fail_on_publish)
    with pytest.raises(TrainingError, match="previous checkpoints are kept"):
        ck.save_checkpoint(tmp_path, 3, tensors={"adapter.safetensors": {"w": torch.zeros(2)}})
    monkeypatch.undo()
    assert resolve_resume(tmp_path, "latest") == tmp_path / "checkpoint-3"
    assert torch.equal(
        ck.load_checkpoint(tmp_path / "checkpoint-3").tensors["adapter.safetensors"]["w"], torch.ones(2)
    )
    outcome("held")


def test_a_utf8_bom_config_still_loads(demo, tmp_path):
    conf = tmp_path / "config"
    shutil.copytree(demo.parent, conf)
    (conf / "config.json").write_bytes(b"\xef\xbb\xbf" + (conf / "config.json").read_bytes())
    assert load_config(conf / "config.json").model_flavour == "tiny"
