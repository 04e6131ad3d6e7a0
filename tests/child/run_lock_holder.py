"""A process that takes an output folder's run lock the way a run does, for tests/test_run_lock.py.

    python -m child.run_lock_holder <folder> [cli]        (from tests/)

Prints "held" once it holds the lock and keeps it until stdin closes. With "cli" it first installs the
CLI's SIGTERM/SIGINT handling (which imports torch: slower). A child process because the lock is per
process: the tests need real other processes to hold it, be refused, get killed and share it.
"""

from __future__ import annotations

import contextlib
import sys

from tunegraph.trainer.training.run_lock import hold_output_dir


def main() -> None:
    folder, *extra = sys.argv[1:]
    signals = contextlib.nullcontext()
    if extra == ["cli"]:
        from tunegraph.trainer.training.distributed import graceful_signals

        signals = graceful_signals()
    with signals, hold_output_dir(folder, "test holder"):
        print("held", flush=True)
        sys.stdin.read()


if __name__ == "__main__":
    main()
