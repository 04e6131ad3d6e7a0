"""How the tests start the modules of this folder: `python -m child.<module>` with tests/ as the working
directory (so `child` and the tests' helper modules import, and a failure is a real traceback)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def child_cmd(module: str, *args: object) -> list[str]:
    """The command line that runs tests/child/<module>.py; start it with cwd=TESTS."""
    return [sys.executable, "-m", f"child.{module}", *map(str, args)]


def child_json(module: str, *args: object, timeout: float) -> dict:
    """Run a child module to the end; its last stdout line is JSON. A failure shows its traceback."""
    proc = subprocess.run(
        child_cmd(module, *args), cwd=TESTS, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
