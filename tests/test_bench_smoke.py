"""`tunegraph bench --smoke`: the GPU harness's code path on the tiny models, on the CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunegraph.trainer.bench.cases import SMOKE_PRECISIONS, SMOKE_RESOLUTIONS, grid, mfu, model_flops
from tunegraph.trainer.bench.table import COLUMNS
from tunegraph.trainer.cli import main


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("bench")
    assert main(["bench", "--smoke", "--out", str(out)]) == 0
    return json.loads((out / "bench.json").read_text()), (out / "bench.md").read_text()


def test_every_case_has_a_row_with_positive_times_and_a_ratio(smoke) -> None:
    result, _ = smoke
    expected = grid(("flux", "hidream"), SMOKE_RESOLUTIONS, SMOKE_PRECISIONS, (True, False))
    rows = result["rows"]
    assert [(r["family"], r["resolution"], r["precision"], r["checkpointing"]) for r in rows] == [
        (c.family, c.resolution, c.precision, c.checkpointing) for c in expected
    ]
    for r in rows:
        assert r["ours_error"] is None and r["plain_error"] is None, r
        assert r["ours_s"] > 0 and r["plain_s"] > 0
        assert r["ratio"] == pytest.approx(r["ours_s"] / r["plain_s"])
        assert r["ours_trainable"] == r["plain_trainable"] > 0  # the same LoKr on both sides
        assert r["tokens"] == (r["resolution"] // 16) ** 2 + (32 if r["family"] == "flux" else 64)


def test_our_loss_equals_the_plain_diffusers_loss_on_the_fixed_batch(smoke) -> None:
    result, _ = smoke
    for r in result["rows"]:
        assert r["ours_loss"] == pytest.approx(r["plain_loss"], rel=1e-4), r
        assert r["loss_match"] is True
    # different bases and resolutions really give different losses (the check is not vacuous)
    assert len({round(r["ours_loss"], 6) for r in result["rows"]}) >= 4


def test_markdown_table_has_a_line_per_case(smoke) -> None:
    result, table = smoke
    lines = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| ---")]
    assert lines[0] == "| " + " | ".join(COLUMNS) + " |"
    assert len(lines) == 1 + len(result["rows"])
    assert "flux 32 | bf16 | yes" in table and "hidream 64 | int8-torchao | no" in table
    assert "MISMATCH" not in table


def test_mfu_formula() -> None:
    assert model_flops(12_000_000_000, 4608) == 6 * 12e9 * 4608
    # 12B params, 4608 tokens, 1 s/step on a 989 TFLOP/s GPU: 6*12e9*4608 / 989e12 = 33.5%
    assert mfu(12_000_000_000, 4608, 1.0, 989.0) == pytest.approx(0.33548, rel=1e-4)
    assert mfu(12_000_000_000, 4608, 1.0, None) is None


def test_device_command_prints_runnable_lines(capsys, tmp_path: Path) -> None:
    assert main(["bench", "--device-command"]) == 0
    text = capsys.readouterr().out
    assert "pip download" in text and "diffusers==0.42.1" in text
    assert text.count("python3 -m tunegraph.trainer.cli bench --out $OUT") == 5


def test_bad_resolution_is_a_clear_error(capsys) -> None:
    assert main(["bench", "--smoke", "--resolution", "50"]) == 2
    assert "multiple of 16" in capsys.readouterr().err
