"""A process that writes checkpoints for tests/test_checkpoint_atomic.py to kill with SIGKILL mid-write.

    python -m child.checkpoint_writer slow <output dir> <step>     (from tests/)
    python -m child.checkpoint_writer loop <output dir>

`slow`: one checkpoint of 50 slow files, printing "writing" as each lands, then "done": the test kills
it after a few. `loop`: prints "ready", then saves checkpoints forever (steps repeat and a total limit
prunes, so every code path of a save runs constantly): the test kills it at a random moment. A child
process because only a real SIGKILL shows that no half-written checkpoint is ever picked up.
"""

from __future__ import annotations

import itertools
import sys
import time
from pathlib import Path

import torch

from tunegraph.trainer.training.checkpoint import save_checkpoint


def slow_file(path: Path) -> None:
    path.write_bytes(b"y" * 100_000)
    print("writing", flush=True)
    time.sleep(0.2)


def slow(out: str, step: str) -> None:
    files = {f"part{i:02d}.bin": slow_file for i in range(50)}
    save_checkpoint(out, int(step), tensors={"adapter.safetensors": {"w": torch.ones(64, 64)}}, files=files)
    print("done", flush=True)


def loop(out: str) -> None:
    print("ready", flush=True)
    for n in itertools.count(1):  # steps repeat (overwrite) and the limit prunes
        save_checkpoint(out, n % 4, tensors={"a.safetensors": {"w": torch.full((128, 128), float(n))}},
                        json={"s.json": {"n": n}}, total_limit=2)  # fmt: skip


def main() -> None:
    command, *args = sys.argv[1:]
    {"slow": slow, "loop": loop}[command](*args)


if __name__ == "__main__":
    main()
