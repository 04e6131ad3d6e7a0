"""The README's "Which settings fit my GPU" table and the full-size activation figures, from the plan.

    .venv/bin/python benchmarks/memory_table.py [--out FILE] [--json]

For Flux.1-dev and HiDream-I1-Full at 512 and 1024 px: LyCORIS LoKr on attention (factor 16, full
matrix, as the reference HiDream config), batch 1, bf16, adamw_bf16, the plan's phases (issue 13's
memory by phase), CUDA kernels (flash attention, bf16 autocast). Each row of the ladder adds the
plan's next cheapest change; a card's cell is the first row whose peak fits it. Nothing is loaded:
every figure is a fake-tensor forward or a sum of exact sizes (about a minute per model on a CPU).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from tunegraph.trainer.config import TrainConfig
from tunegraph.trainer.plan.advice import cheapest_fit
from tunegraph.trainer.plan.estimate import GiB, build_plan
from tunegraph.trainer.plan.inputs import plan_inputs

CARDS = (12, 16, 24, 48, 80)
LOKR = {"algo": "lokr", "factor": 16, "linear_dim": 16384, "linear_alpha": 1, "full_matrix": True,
        "apply_preset": {"target_module": ["Attention"]}}  # fmt: skip


def ladder(family: str, px: int, lyco: Path) -> list[tuple[str, object]]:
    cfg = TrainConfig.from_dict(
        {
            "model_family": family,
            "lora_type": "lycoris",
            "lycoris_config": str(lyco),
            "resolution": px,
            "validation_resolution": str(px),
            "optimizer": "adamw_bf16",
            "mixed_precision": "bf16",
        }  # fmt: skip
    )
    plan = build_plan(plan_inputs(cfg), cfg)
    rows = [("as configured (bf16, no checkpointing)", plan)]
    for change in cheapest_fit(plan.inputs, cfg, 0):
        if "resolution" not in change.keys:
            rows.append(("+ " + change.what, change.plan))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="also write the markdown here")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    lyco = Path(tempfile.mkdtemp()) / "lycoris_config.json"
    lyco.write_text(json.dumps(LOKR))
    lines = [
        "| model | px | settings (cumulative) | peak GiB (phase) | "
        + " | ".join(f"{c} GB" for c in CARDS)
        + " |"
    ]
    lines.append("|" + "---|" * (4 + len(CARDS)))
    figures = []
    for family, name in (("flux", "Flux.1-dev"), ("hidream", "HiDream-I1")):
        for px in (512, 1024):
            rows = ladder(family, px, lyco)
            first = {
                c: next((i for i, (_, pl) in enumerate(rows) if pl.peak.device <= c * GiB), None)
                for c in CARDS
            }
            for i, (what, plan) in enumerate(rows):
                cells = ["**fits**" if first[c] == i else "" for c in CARDS]
                peak = f"{plan.peak.device / GiB:.1f} ({plan.peak.name})"
                lines.append(f"| {name} | {px} | {what} | {peak} | " + " | ".join(cells) + " |")
                a = plan.activations
                figures.append({"model": name, "px": px, "settings": what, "peak_gib": round(plan.peak.device / GiB, 2),
                                "checkpointing": plan.inputs.checkpointing, "base": plan.inputs.base_precision,
                                "activations_kept_gib": round(a.kept / GiB, 3),
                                "activations_recompute_gib": round(a.recompute / GiB, 3),
                                "kib_per_image_token": round(a.per_token / 1024, 1)})  # fmt: skip
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if args.json:
        print(json.dumps(figures))


if __name__ == "__main__":
    main()
