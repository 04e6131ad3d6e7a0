"""The benchmark's markdown table, and the command line that runs it on a GPU machine."""

from __future__ import annotations

from typing import Any

COLUMNS = (
    "model, res",
    "base",
    "ckpt",
    "ours s/step",
    "ours GiB",
    "plain s/step",
    "plain GiB",
    "ours/plain",
    "trainable",
    "MFU ours",
    "MFU plain",
    "loss ours / plain",
)


def _f(value: Any, fmt: str, missing: str = "—") -> str:
    return missing if value is None else format(value, fmt)


def _count(n: int | None) -> str:
    return "—" if not n else (f"{n / 1e6:.2f}M" if n >= 10**6 else str(n))


def _cell(row: dict, side: str, key: str, fmt: str) -> str:
    error = row.get(f"{side}_error")
    return error.split(":")[0] if error else _f(row.get(f"{side}_{key}"), fmt)


def format_row(row: dict) -> list[str]:
    loss = f"{_f(row['ours_loss'], '.5f')} / {_f(row['plain_loss'], '.5f')}"
    if row["loss_match"] is False:
        loss += f" MISMATCH ({row['loss_rel_diff']:.1e})"
    trainable = row["ours_trainable"]
    return [
        f"{row['family']} {row['resolution']}",
        row["precision"],
        "yes" if row["checkpointing"] else "no",
        _cell(row, "ours", "s", ".3f"),
        _cell(row, "ours", "gib", ".1f"),
        _cell(row, "plain", "s", ".3f"),
        _cell(row, "plain", "gib", ".1f"),
        _f(row["ratio"], ".2f"),
        _count(trainable),
        _f(row["ours_mfu"], ".1%"),
        _f(row["plain_mfu"], ".1%"),
        loss,
    ]


def markdown_table(result: dict) -> str:
    """Header line (device, settings) and one table row per case."""
    s = result["settings"]
    head = (
        f"device: {result['device']} (torch {result['torch']}, peak {_f(result['peak_tflops'], '.0f')} "
        f"bf16 TFLOP/s); batch 1, LoKr factor 16 full-matrix on attention"
        f"{' (bypass mode)' if s['bypass'] else ''}; mean of {s['steps']} steps after {s['warmup']} warm-up; "
        "MFU = 6 * active params * (image + text tokens) / s/step / peak"
    )
    lines = [head, "", "| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    lines += ["| " + " | ".join(format_row(r)) + " |" for r in result["rows"]]
    return "\n".join(lines)


# What the GPU image lacks (torch, transformers, accelerate, peft are there): versions as in .venv.
WHEELS = (
    "diffusers==0.42.1",
    "lycoris-lora==4.1.3",
    "torchao==0.18.0",
    "optimum-quanto==0.2.7",
    "bitsandbytes==0.50.2",
)


def device_commands() -> str:
    """The exact steps for a session that has the GPU device tool."""
    pkgs = " ".join(WHEELS)
    setup = (
        "mkdir -p /tmp/p && ln -sfn $PWD /tmp/p/tunegraph && "
        "python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && "
        "export PYTHONPATH=/tmp/site:/tmp/p PYTHONUNBUFFERED=1"
    )
    bench = "python3 -m tunegraph.trainer.cli bench --out $OUT"
    return "\n".join(
        [
            "# 1. here, in the repo root (once): wheels the GPU image lacks",
            "echo /.whl/ >> .git/info/exclude",
            "python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "
            "--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 "
            f"--platform manylinux2014_x86_64 -d .whl {pkgs}",
            '# 2. device tool `run`, carry [".whl"], timeout_s 600; one call per line (each < 10 min):',
            f"{setup} && {bench} --family flux --precision bf16",
            f"{setup} && {bench} --family flux --precision int8-torchao --precision int8-quanto --precision nf4-bnb",
            f"{setup} && {bench} --family hidream --precision bf16",
            f"{setup} && {bench} --family hidream --precision int8-torchao --precision nf4-bnb",
            f"{setup} && {bench} --family flux --resolution 1024 --checkpointing yes --bypass",
            "# each writes $OUT/bench.md and $OUT/bench.json; paste bench.md into the issue",
        ]
    )
