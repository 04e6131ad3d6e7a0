"""`tunegraph` command line: train | check | cache | validate | export | demo | tiny-models | plan | bench.

Every command takes `--json`: a machine-readable summary is then the last line of stdout. Logs and
progress bars go to stderr.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from .errors import TuneGraphError


def _config(args: argparse.Namespace):
    from .config import load_config

    return load_config(args.config, dict(args.set or []))


def _key_value(text: str) -> tuple[str, str]:
    """--set KEY=VALUE; anything else is a usage error (argparse exits 2 with the message)."""
    key, eq, value = text.partition("=")
    if not eq or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), value


def cmd_train(args: argparse.Namespace) -> dict[str, Any]:
    """Also under `torchrun --nproc_per_node N -m tunegraph.trainer.cli train ...` (one rank each)."""
    cfg = _config(args)  # first: a config error is one line in a second, before torch is imported
    from .training.distributed import graceful_signals, teardown
    from .training.loop import train

    try:
        with graceful_signals():  # SIGTERM/SIGINT: stop after the step, checkpoint, exit 130
            return train(cfg, final_checkpoint=args.final_checkpoint)
    finally:
        teardown()


def cmd_check(args: argparse.Namespace) -> dict[str, Any]:
    cfg = _config(args)
    from .preflight import describe, preflight

    report = preflight(cfg)
    if not args.json:
        print(describe(report))
    return report


def cmd_cache(args: argparse.Namespace) -> dict[str, Any]:
    cfg = _config(args)
    from .cache.build import build_caches
    from .models.prepare import prepare_model

    return build_caches(cfg, prepare_model(cfg), progress=True)


def cmd_validate(args: argparse.Namespace) -> dict[str, Any]:
    cfg = _config(args)
    from .training.validate_run import validate_adapter

    return validate_adapter(cfg, Path(args.adapter) if args.adapter else None)


def cmd_export(args: argparse.Namespace) -> dict[str, Any]:
    from .commands.export import export_checkpoint

    out = export_checkpoint(Path(args.checkpoint), Path(args.out))
    return {"adapter": str(out)}


def cmd_demo(args: argparse.Namespace) -> dict[str, Any]:
    from .commands.demo import run_demo

    return run_demo(Path(args.out), steps=args.steps)


def cmd_tiny_models(args: argparse.Namespace) -> dict[str, Any]:
    from .commands.tiny_models import write_comfyui_models, write_tiny_models
    from .errors import ConfigError

    if args.out is None and args.comfyui is None:
        raise ConfigError("tiny-models: give --out DIR, --comfyui COMFYUI_DIR, or both")
    written = {}
    if args.out is not None:
        written = write_tiny_models(Path(args.out), families=tuple(args.family), seed=args.seed)
    summary = {name: str(path) for name, path in written.items()}
    if args.comfyui is not None:
        summary["comfyui"] = write_comfyui_models(Path(args.comfyui), tuple(args.family), args.seed)
    return summary


def cmd_plan(args: argparse.Namespace) -> dict[str, Any]:
    from .commands.plan import cmd_plan as run

    return run(args, _config(args))


def cmd_bench(args: argparse.Namespace) -> dict[str, Any]:
    from .bench.command import cmd_bench as run

    return run(args)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tunegraph", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn, help_: str, config: bool = False) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.set_defaults(fn=fn)
        sp.add_argument("--json", action="store_true", help="print a JSON summary as the last stdout line")
        if config:
            sp.add_argument("--config", required=True, help="SimpleTuner-style config.json")
            sp.add_argument(
                "--set",
                action="append",
                type=_key_value,
                metavar="KEY=VALUE",
                help="override a config key (repeatable)",
            )
        return sp

    sp = add("train", cmd_train, "train an adapter from a SimpleTuner config.json", config=True)
    sp.add_argument(
        "--final-checkpoint", action="store_true", help="also checkpoint the last step (to continue it later)"
    )
    add(
        "check", cmd_check, "check a config without loading weights; print what would be trained", config=True
    )
    add("cache", cmd_cache, "build the VAE-latent and text-embed caches for a config", config=True)
    sp = add("validate", cmd_validate, "render validation images for a config (and an adapter)", config=True)
    sp.add_argument("--adapter", help="adapter .safetensors (default: the config's output_dir final file)")
    sp = add("export", cmd_export, "export a checkpoint folder as a ComfyUI-loadable adapter file")
    sp.add_argument("--checkpoint", required=True, help="output_dir/checkpoint-N folder")
    sp.add_argument("--out", required=True, help="adapter file to write (.safetensors)")
    sp = add("demo", cmd_demo, "train the tiny Flux LoKr on a generated dataset (about a minute on CPU)")
    sp.add_argument("--out", default="output/demo", help="output folder (default: output/demo)")
    sp.add_argument("--steps", type=int, default=None, help="training steps (default: the demo's own)")
    sp = add("tiny-models", cmd_tiny_models, "write the tiny models as diffusers folders")
    sp.add_argument("--out", help="folder to write <family>/ model folders into")
    sp.add_argument("--comfyui", metavar="DIR", help="also write them into this ComfyUI's models/ folders")
    sp.add_argument("--family", action="append", default=None, help="flux (default) or hidream; repeatable")
    sp.add_argument("--seed", type=int, default=0)
    sp = add("plan", cmd_plan, "estimate device memory and host RAM per phase before training", config=True)
    from .commands.plan import add_arguments as add_plan_arguments

    add_plan_arguments(sp)
    sp = add(
        "bench", cmd_bench, "time our training step against plain diffusers + LyCORIS (GPU; --smoke on CPU)"
    )
    from .bench.command import add_arguments as add_bench_arguments

    add_bench_arguments(sp)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if getattr(args, "family", "absent") is None:
        args.family = ["flux"]
    rank = int(os.environ.get("RANK", "0") or 0)  # set by torchrun / accelerate launch
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format=f"tunegraph[rank {rank}]: %(message)s"
        if "WORLD_SIZE" in os.environ
        else "tunegraph: %(message)s",
        stream=sys.stderr,
    )
    try:
        summary = args.fn(args)
    except TuneGraphError as e:
        print(f"error: {e}", file=sys.stderr)
        if args.json:
            print(json.dumps({"error": str(e)}))
        return 2
    except KeyboardInterrupt:
        print("interrupted: the last checkpoint is kept; run again to continue from it", file=sys.stderr)
        return 130
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = os.path.dirname(e.filename) if e.filename else "the output folder"
        print(f"error: the disk is full while writing {e.filename or where}; free space in {where} "
              "and run again (checkpoints already written are kept)", file=sys.stderr)  # fmt: skip
        return 2
    if args.json and rank == 0:  # one summary per job, not one per process
        print(json.dumps(summary, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
