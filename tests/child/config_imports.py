"""Whether importing the config (and its key table) loads torch, for tests/test_config_keys_used.py.

    python -m child.config_imports        (from tests/)

Prints one JSON line: {"torch_imported": bool}. A child process because it needs an interpreter that
has imported nothing yet: torch, once loaded (as in any pytest process), cannot be unloaded.
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    import tunegraph.trainer.config  # noqa: F401

    print(json.dumps({"torch_imported": "torch" in sys.modules}))


if __name__ == "__main__":
    main()
