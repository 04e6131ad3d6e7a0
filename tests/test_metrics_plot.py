import json
import logging
import math
import time

import pytest
import torch
from PIL import Image

from tunegraph.trainer.errors import ConfigError
from tunegraph.trainer.training.metrics import (
    MetricsWriter,
    TrainProgress,
    parse_report_to,
    read_metrics,
    truncate_metrics,
)
from tunegraph.trainer.training.plot import plot_loss, smooth


def test_jsonl_one_object_per_line_flushed(tmp_path):
    writer = MetricsWriter(tmp_path, "none", "run")
    writer.log(1, loss=torch.tensor(0.5), lr=1e-4, grad_norm=2.0, seconds=0.1)
    # flushed before close: another reader sees the line now
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[0]) == {"step": 1, "loss": 0.5, "lr": 1e-4, "grad_norm": 2.0, "seconds": 0.1}
    writer.log(2, loss=float("nan"), lr=1e-4)
    writer.log(2, eval_loss=0.25)
    writer.close()
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert records[1]["loss"] is None  # NaN written as null: the file stays strict JSON
    assert records[2] == {"step": 2, "eval_loss": 0.25}
    assert "NaN" not in (tmp_path / "metrics.jsonl").read_text()


def test_resume_truncates_later_steps_and_torn_line(tmp_path):
    with MetricsWriter(tmp_path) as w:
        for step in range(1, 6):
            w.log(step, loss=1.0 / step)
        w.log(4, eval_loss=0.3)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # killed mid-line
    with MetricsWriter(tmp_path, resume_step=3) as w:
        w.log(4, loss=0.2)
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[-1]["loss"] == 0.2
    # a fresh run (resume_step 0) starts a clean file
    with MetricsWriter(tmp_path) as w:
        w.log(1, loss=9.0)
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 9.0}]
    assert truncate_metrics(tmp_path / "missing.jsonl", 3) == 0


def test_tensorboard_event_file_written(tmp_path):
    with MetricsWriter(tmp_path, "tensorboard", "myrun") as w:
        for step in range(1, 4):
            w.log(step, loss=1.0 / step, lr=1e-3)
        logdir = w.tensorboard_dir
    assert logdir == tmp_path / "logs" / "myrun"
    events = list(logdir.glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3]
    assert acc.Scalars("loss")[1].value == pytest.approx(0.5)


def test_report_to_parsing_and_unsupported_warning(tmp_path, caplog):
    assert parse_report_to("none") == []
    assert parse_report_to(None) == []
    assert parse_report_to("tensorboard, wandb") == ["tensorboard", "wandb"]
    assert parse_report_to("all") == ["tensorboard", "wandb", "comet_ml"]
    with pytest.raises(ConfigError, match="report_to: unknown tracker 'tensorbord'"):
        parse_report_to("tensorbord")
    with caplog.at_level(logging.WARNING, logger="tunegraph"):
        MetricsWriter(tmp_path, "wandb").close()
    assert "'wandb' is not supported" in caplog.text
    assert not (tmp_path / "logs").exists()


def test_progress_disabled_still_tracks_eta():
    p = TrainProgress(10, initial_step=4, enabled=False)
    assert p.eta_seconds is None
    time.sleep(0.02)
    p.update(2, loss=0.1, lr=1e-4)
    assert p.step == 6
    eta = p.eta_seconds
    assert eta is not None and eta > 0.02  # 4 steps left at >= 10 ms per step
    p.write("a line")
    p.close()


def test_progress_bar_shows_loss_and_lr(capsys):
    with TrainProgress(5, enabled=True) as p:
        p.update(1, loss=0.123456, lr=2e-4)
    err = capsys.readouterr().err
    assert "loss=0.1235" in err and "lr=0.0002" in err and "1/5" in err


def test_smooth_is_debiased_ema():
    assert smooth([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])
    out = smooth([1.0, 3.0], weight=0.5)
    # avg1 = 0.5 -> 1.0 ; avg2 = 0.25 + 1.5 = 1.75 -> 1.75 / 0.75
    assert out == pytest.approx([1.0, 1.75 / 0.75])


def test_plot_loss_png(tmp_path):
    metrics = [{"step": s, "loss": 1.0 / s + 0.05 * math.sin(s), "lr": 1e-4} for s in range(1, 101)]
    metrics += [{"step": s, "eval_loss": 0.9 / s**0.5} for s in (1, 25, 50, 100)]
    metrics.append({"step": 101, "loss": None})
    out = plot_loss(metrics, tmp_path / "plots" / "loss.png")
    assert out == tmp_path / "plots" / "loss.png"
    assert out.stat().st_size > 20_000
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size == (990, 550)
        colors = img.convert("RGB").getcolors(maxcolors=100_000)
    assert len(colors) > 50  # lines, markers, text: not a blank canvas
    empty = plot_loss([], tmp_path / "empty.png")
    assert empty.stat().st_size > 5_000
