"""Peak host RAM while loading a ComfyUI-format Flux file: our loader vs diffusers' from_single_file.

Writes a full-width Flux slice (hidden 3072, 24 heads; 1 double + 2 single blocks, ~1.2 GB in bf16)
as a ComfyUI (BFL-keyed, `model.diffusion_model.`) file in a temp dir, plus its float8_e4m3fn twin,
then loads each in a fresh child process and reports (peak RSS - RSS before loading) / file size,
right after loading and after touching every weight once (diffusers keeps a bf16 file's tensors
memory-mapped when no cast is needed, so its pages only count once the first step reads them):

- bf16 file: ours (meta device + mmap + assign, block by block) and stock
  `FluxTransformer2DModel.from_single_file(path, config=<local folder>)` (offline);
- fp8 file: ours as an fp8 base (`base_model_precision: fp8-file`, weights stay float8) and the
  stock path, which upcasts to bf16.

Goals (issue 13): bf16 <= 1.10x (stock ~1.27x); fp8 base <= 1.3x the fp8 file. Not a timed test:
`python benchmarks/single_file_memory.py [--double 1 --single 2]`. The temp dir is deleted after.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

CONFIG = {"attention_head_dim": 128, "axes_dims_rope": [16, 56, 56], "guidance_embeds": True, "in_channels": 64,
          "joint_attention_dim": 4096, "num_attention_heads": 24, "patch_size": 1, "pooled_projection_dim": 768}  # fmt: skip


def status_bytes(field: str) -> int:
    """VmRSS (now) or VmHWM (peak) of this process. Not ru_maxrss: Linux carries that over from the
    parent across fork + exec, so a child would report the writer's peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def write_files(folder: Path, double: int, single: int) -> tuple[Path, Path, Path]:
    """A random full-width Flux slice as ComfyUI bf16 and fp8 files, and a local diffusers config folder."""
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import save_file

    from tunegraph.trainer.models.comfy_keys import flux_to_comfy

    config = {**CONFIG, "num_layers": double, "num_single_layers": single}
    with torch.device("meta"):
        model = FluxTransformer2DModel.from_config(config)
    g = torch.Generator().manual_seed(0)
    sd = {
        k: (torch.randn(v.shape, generator=g) * 0.02).to(torch.bfloat16)
        for k, v in model.state_dict().items()
    }
    comfy = {f"model.diffusion_model.{k}": v.contiguous() for k, v in flux_to_comfy(sd).items()}
    del sd
    bf16, fp8 = folder / "flux-slice-bf16.safetensors", folder / "flux-slice-fp8.safetensors"
    save_file(comfy, str(bf16))
    fp8_sd = {k: (v.to(torch.float8_e4m3fn) if v.ndim == 2 else v) for k, v in comfy.items()}
    del comfy
    save_file(fp8_sd, str(fp8))
    del fp8_sd
    cfg_dir = folder / "config"
    cfg_dir.mkdir()
    (cfg_dir / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel", **config}))
    return bf16, fp8, cfg_dir


def child(mode: str, path: str, cfg_dir: str) -> None:
    """Load once and print {"peak": bytes above the pre-load RSS}."""
    from diffusers import FluxTransformer2DModel

    from tunegraph.trainer.models.single_file import transformer_from_file
    from tunegraph.trainer.models.weights_file import WeightsFile

    before = status_bytes("VmRSS")
    if mode == "ours":
        model = transformer_from_file("flux", WeightsFile.open(path, "benchmark", "file"), torch.bfloat16)
    elif mode == "ours-fp8-base":
        model = transformer_from_file(
            "flux", WeightsFile.open(path, "benchmark", "file"), torch.bfloat16, fp8_base=True
        )
    else:
        model = FluxTransformer2DModel.from_single_file(
            path, config=cfg_dir, torch_dtype=torch.bfloat16, local_files_only=True
        )
    loaded = status_bytes("VmHWM")
    with torch.no_grad():  # touch every weight, as the first step does (memory-mapped pages load now)
        for p in model.parameters():
            p.detach().reshape(-1).view(torch.uint8).max()  # bytes: float8 has no max() on CPU
    touched = status_bytes("VmHWM")
    print(json.dumps({"peak": loaded - before, "touched": touched - before}))


def measure(mode: str, path: Path, cfg_dir: Path) -> dict[str, float]:
    """Peak RSS above the pre-load RSS over the file size: after loading, and after touching every weight."""
    out = subprocess.run([sys.executable, __file__, "--child", mode, str(path), str(cfg_dir)],
                         capture_output=True, text=True, check=True)  # fmt: skip
    peaks = json.loads(out.stdout.strip().splitlines()[-1])
    return {k: round(v / path.stat().st_size, 3) for k, v in peaks.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--double", type=int, default=1)
    parser.add_argument("--single", type=int, default=2)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    with tempfile.TemporaryDirectory() as tmp:
        bf16, fp8, cfg_dir = write_files(Path(tmp), args.double, args.single)
        rows = {
            "bf16 file, ours": measure("ours", bf16, cfg_dir),
            "bf16 file, diffusers from_single_file": measure("stock", bf16, cfg_dir),
            "fp8 file, ours as fp8 base": measure("ours-fp8-base", fp8, cfg_dir),
            "fp8 file, diffusers from_single_file (upcast to bf16)": measure("stock", fp8, cfg_dir),
        }
        sizes = {"bf16 file GB": bf16.stat().st_size / 1e9, "fp8 file GB": fp8.stat().st_size / 1e9}
    for name, r in rows.items():
        print(f"{name:55s} peak RSS / file: loaded {r['peak']:.2f}x, weights touched {r['touched']:.2f}x")
    print(json.dumps({**sizes, **rows}))


if __name__ == "__main__":
    main()
