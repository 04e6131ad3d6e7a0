"""Loss plot PNG from metrics records: raw and smoothed training loss, eval loss markers.

Uses matplotlib's object API on an Agg canvas (no pyplot global state), so it is safe inside the
ComfyUI server process and on machines without a display.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _series(metrics: Iterable[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for record in metrics:
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            steps.append(int(record.get("step", len(steps))))
            values.append(float(value))
    return steps, values


def smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """Tensorboard-style exponential moving average, debiased so the first points are not pulled to 0."""
    out, avg = [], 0.0
    for i, value in enumerate(values, start=1):
        avg = weight * avg + (1 - weight) * value
        out.append(avg / (1 - weight**i))
    return out


def plot_loss(
    metrics: list[dict[str, Any]],
    out_png: str | Path,
    *,
    title: str = "Training loss",
    smoothing: float = 0.9,
    log_scale: bool = False,
) -> Path:
    """Write the loss plot to `out_png` and return its path (`log_scale`: a log y axis)."""
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(9, 5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    steps, loss = _series(metrics, "loss")
    eval_steps, eval_loss = _series(metrics, "eval_loss")
    if steps:
        ax.plot(steps, loss, color="tab:blue", alpha=0.3, linewidth=1, label="loss")
        ax.plot(
            steps, smooth(loss, smoothing), color="tab:blue", linewidth=2, label=f"loss (EMA {smoothing})"
        )
    if eval_steps:
        ax.plot(eval_steps, eval_loss, color="tab:orange", marker="o", linewidth=1.5, label="eval loss")
    if not steps and not eval_steps:
        ax.text(0.5, 0.5, "no loss recorded yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(title)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("MSE loss (flow matching)")
    if log_scale and (steps or eval_steps) and min(loss + eval_loss) > 0:
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    if steps or eval_steps:
        ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(out, format="png")
    return out
