"""`tunegraph bench`: our step against a plain diffusers + LyCORIS step, case by case.

One base model is built per (family, precision) and serves every resolution and checkpointing
setting of that group: our run first (prepare_run quantises it exactly as a user's run would), then
the plain step on the same weights, so step 1's losses must agree. A case that runs out of memory
is recorded as such and the run goes on.
"""

from __future__ import annotations

import itertools
import logging
import tempfile
from pathlib import Path
from typing import Any

import torch

from .build import active_params, build_bundle, build_transformer, synthetic_batch
from .cases import Case, mfu, peak_tflops, text_tokens
from .ours import bench_config, our_step, release
from .plain import plain_step
from .timing import free_memory, is_oom

log = logging.getLogger("tunegraph")
LOSS_RTOL = 2e-3  # bf16 forward of the same weights and inputs through the same kernels


def _side(fn, device: torch.device, *args, **kwargs) -> tuple[Any, str | None]:
    """Run one side; the adapter, optimizer and activations it held are freed before the next."""
    try:
        return fn(*args, **kwargs), None
    except Exception as e:  # one failing case (OOM, a backend bug) must not end the whole bench
        if not is_oom(e):
            log.exception("bench case failed")
        return None, ("OOM" if is_oom(e) else f"{type(e).__name__}: {str(e)[:200]}")
    finally:
        free_memory(device)


def _tokens(case: Case, smoke: bool) -> int:
    text = text_tokens(case.family, smoke) * (2 if case.family == "hidream" else 1)  # HiDream: T5 + Llama
    return case.image_tokens + text


def _row(
    case: Case, ours: Any, plain: Any, errors: dict, n_active: int, peak: float | None, smoke: bool
) -> dict:
    row: dict[str, Any] = {**case.as_dict(), "active_params": n_active, "tokens": _tokens(case, smoke)}
    for side, result in (("ours", ours), ("plain", plain)):
        timing = result[0] if result else None
        row[f"{side}_s"] = timing.seconds if timing else None
        row[f"{side}_gib"] = timing.peak_gib if timing else None
        row[f"{side}_loss"] = timing.first_loss if timing else None
        row[f"{side}_trainable"] = result[1] if result else None
        row[f"{side}_mfu"] = mfu(n_active, row["tokens"], row[f"{side}_s"], peak)
        row[f"{side}_error"] = errors.get(side)
    row["ratio"] = row["ours_s"] / row["plain_s"] if row["ours_s"] and row["plain_s"] else None
    if row["ours_loss"] is not None and row["plain_loss"] is not None:
        diff = abs(row["ours_loss"] - row["plain_loss"])
        row["loss_rel_diff"] = diff / max(abs(row["plain_loss"]), 1e-12)
        row["loss_match"] = row["loss_rel_diff"] <= LOSS_RTOL
    else:
        row["loss_rel_diff"], row["loss_match"] = None, None
    return row


def _group(
    cases: list[Case], settings: dict, device: torch.device, peak: float | None, workdir: Path
) -> list[dict]:
    first, smoke = cases[0], settings["smoke"]
    try:
        transformer = build_transformer(first.family, smoke, device, seed=settings["seed"])
        n_active = active_params(transformer)
        model = build_bundle(first.family, transformer, smoke, device, torch.bfloat16)
    except Exception as e:
        error = "OOM" if is_oom(e) else f"{type(e).__name__}: {str(e)[:200]}"
        free_memory(device)
        return [_row(c, None, None, {"ours": error, "plain": error}, 0, peak, smoke) for c in cases]
    rows = []
    common = {"warmup": settings["warmup"], "steps": settings["steps"]}
    for case in cases:
        log.info("bench: %s", case)
        batch = synthetic_batch(case, model.transformer, smoke, seed=settings["seed"])
        cfg = bench_config(case, workdir, settings["seed"], settings["lr"], settings["bypass"], smoke)
        ours, our_error = _side(our_step, device, model, cfg, batch, **common)
        plain, plain_error = _side(
            plain_step, device, model.transformer, case, batch, seed=settings["seed"], lr=settings["lr"],
            bypass=settings["bypass"], **common,
        )  # fmt: skip
        errors = {"ours": our_error, "plain": plain_error}
        rows.append(_row(case, ours and (ours[0], ours[1]), plain, errors, n_active, peak, smoke))
    release(model)
    del model, transformer
    free_memory(device)
    return rows


def run_bench(
    cases: list[Case],
    *,
    smoke: bool = False,
    device: str | None = None,
    warmup: int = 3,
    steps: int = 5,
    seed: int = 0,
    lr: float = 1e-4,
    bypass: bool = False,
    peak: float | None = None,
) -> dict[str, Any]:
    """Measure every case; returns {"device", "peak_tflops", "settings", "rows"}."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    peak = peak if peak is not None else peak_tflops(name)
    settings = {"smoke": smoke, "warmup": warmup, "steps": steps, "seed": seed, "lr": lr, "bypass": bypass}
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="tunegraph-bench-") as tmp:
        for _, group in itertools.groupby(cases, key=lambda c: (c.family, c.precision)):
            rows += _group(list(group), settings, dev, peak, Path(tmp))
    return {
        "device": name,
        "torch": torch.__version__,
        "peak_tflops": peak,
        "settings": settings,
        "rows": rows,
    }
