"""Random-number state for bit-exact resume: the global RNGs plus the loop's own generators.

The loop draws sigmas, noise and caption dropout from its own `torch.Generator`s, so it does not
depend on whatever else touched the global RNGs; both kinds are saved. Every value in the captured
dict is a tensor, int, list or dict, so `torch.load(..., weights_only=True)` reads it back.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from ..errors import TrainingError


def make_generator(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A seeded generator for the loop (CPU by default: the same stream on every machine)."""
    return torch.Generator(device=device).manual_seed(int(seed))


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA) global RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _python_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    return {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss}


def _numpy_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "name": name,
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached),
    }


def capture_rng_state(generators: dict[str, torch.Generator] | None = None) -> dict[str, Any]:
    """Snapshot of python random, numpy, torch CPU, CUDA (when available) and the named generators."""
    state: dict[str, Any] = {
        "python": _python_state(),
        "numpy": _numpy_state(),
        "torch": torch.get_rng_state(),
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any], generators: dict[str, torch.Generator] | None = None) -> None:
    """Put back what `capture_rng_state` took. Named generators must exist in both; a generator
    missing from the saved state is an error, because silently reseeding breaks bit-exact resume."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["internal"].tolist()), py["gauss"]))
    nps = state["numpy"]
    keys = nps["keys"].numpy().astype(np.uint32)
    np.random.set_state((nps["name"], keys, nps["pos"], nps["has_gauss"], nps["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        # A resume on fewer/more GPUs restores the devices both runs have.
        for index, dev_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(dev_state, index)
    saved_gens = state.get("generators", {})
    for name, gen in (generators or {}).items():
        if name not in saved_gens:
            raise TrainingError(
                f"checkpoint RNG state has no generator '{name}' (it has: {sorted(saved_gens)}); "
                "it was written by a different training setup: resume from a matching checkpoint"
            )
        gen.set_state(saved_gens[name])
