"""What each rank runs when TuneGraph starts a training process group itself (the TrainLoKr node):
`python -m torch.distributed.run ... rank_main.py train --config C`.

Inside ComfyUI the pack lives in `custom_nodes/<any folder name>/` and may not be pip-installed, so
`-m tunegraph.trainer.cli` might not resolve; this file imports the pack it sits in as `tunegraph`,
then runs the CLI. Only the standard library is imported before that.
"""

import importlib.util
import os
import sys
from pathlib import Path


def _import_pack(root: Path) -> None:
    spec = importlib.util.spec_from_file_location(
        "tunegraph", root / "__init__.py", submodule_search_locations=[str(root)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["tunegraph"] = module
    spec.loader.exec_module(module)


def main() -> int:
    here = Path(__file__).resolve()
    if sys.path and os.path.abspath(sys.path[0] or ".") == str(here.parent):
        sys.path.pop(0)  # this folder's module names (flow, metrics, run, ...) must not shadow others
    _import_pack(here.parents[2])
    from tunegraph.trainer.cli import main as cli_main

    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
