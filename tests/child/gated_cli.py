"""The `tunegraph` CLI started on a signal, for tests/test_run_lock.py's two runs on one folder.

    python -m child.gated_cli <go file> <tunegraph arguments...>        (from tests/)

Imports everything first, writes `<go file>.ready-<pid>`, waits until `<go file>` exists, then runs the
CLI: two of them reach the output folder's lock at the same instant. A child process because each run
is a real, separate `tunegraph train`.
"""

from __future__ import annotations

import os
import sys
import time

import tunegraph.trainer.training.loop  # noqa: F401  (the slow imports, before the start signal)
from tunegraph.trainer.cli import main as cli_main


def main() -> None:
    go, *args = sys.argv[1:]
    open(f"{go}.ready-{os.getpid()}", "w").close()
    while not os.path.exists(go):
        time.sleep(0.005)
    sys.exit(cli_main(args))


if __name__ == "__main__":
    main()
