"""AdaptiveGuider against ComfyUI's own guiders on the tiny Flux, for tests/test_guider_comfy.py.

    python -m child.guider_parity <comfyui>        (from tests/)

Samples with CFGGuider, Guider_Basic and AdaptiveGuider at several thresholds in a real ComfyUI,
counting the model evaluations, and runs the trainer's validation sampler on the same noise and
schedule. Prints one JSON line of numbers; the test asserts on them. A child process because
ComfyUI's modules set global state (arguments, device, logging) when imported.
"""

from __future__ import annotations

import json
import sys

import torch

from child.comfy_start import start_comfy
from tunegraph.nodes.comfy_model import to_comfy_model, to_conditioning
from tunegraph.trainer.config import TrainConfig
from tunegraph.trainer.models import load_model
from tunegraph.trainer.training.guidance import GuidanceStats
from tunegraph.trainer.training.sampling import sample_latents, sampling_sigmas

STEPS, CFG = 8, 4.0


class Sampling:
    """The tiny Flux as a ComfyUI model, its conditioning, schedule and sampler; counts evaluations."""

    def __init__(self) -> None:
        import comfy.samplers

        self.bundle = load_model(TrainConfig.from_dict({"model_flavour": "tiny", "seed": 3}), device="cpu",
                                 dtype=torch.float32)  # fmt: skip
        self.patcher = to_comfy_model(self.bundle)
        self.calls: list[int] = []
        self.patcher.set_model_unet_function_wrapper(self._count)
        self.pos = to_conditioning(self.bundle, "a red circle", 3.5)
        self.neg = to_conditioning(self.bundle, "blurry", 3.5)
        self.sigmas = sampling_sigmas(self.bundle, 8, 8, STEPS)
        self.sampler = comfy.samplers.sampler_object("euler")
        self.latent = torch.zeros(1, 16, 8, 8)

    def _count(self, apply, a: dict):
        self.calls.append(a["input"].shape[0])
        return apply(a["input"], a["timestep"], **a["c"])

    def run(self, guider, seed: int, sig=None, lat=None, zero_noise: bool = False):
        """(latents, model evaluations) of one sampling run."""
        sig = self.sigmas if sig is None else sig
        lat = self.latent if lat is None else lat
        self.calls.clear()
        n = torch.zeros_like(lat) if zero_noise else noise(seed)
        out = guider.sample(n, lat, self.sampler, sig, seed=seed, disable_pbar=True)
        return out, sum(self.calls)

    def adaptive(self, threshold: float, no_cfg: int = 0, uz: float = 0.0):
        from tunegraph.nodes.guider_nodes import AdaptiveGuider

        return AdaptiveGuider.execute(self.patcher, self.pos, self.neg, CFG, threshold, no_cfg, uz).args[0]


def noise(seed: int) -> torch.Tensor:
    return torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(seed))


def guider_numbers(s: Sampling) -> dict:
    """AdaptiveGuider vs CFGGuider / BasicGuider: errors, CFG steps, evaluations, similarities."""
    import comfy.samplers
    from comfy_extras.nodes_custom_sampler import Guider_Basic

    cfgg = comfy.samplers.CFGGuider(s.patcher)
    cfgg.set_conds(s.pos, s.neg)
    cfgg.set_cfg(CFG)
    basic = Guider_Basic(s.patcher)
    basic.set_conds(s.pos)
    r = {}
    ref, r["evals_cfg"] = s.run(cfgg, 1)
    g = s.adaptive(1.0)
    out, r["evals_t1"] = s.run(g, 1)
    r["t1_err"] = (out - ref).abs().max().item()
    r["t1_cfg_steps"] = g.stats.cfg_steps
    r["scale"] = ref.abs().max().item()
    # threshold 0: CFG on step 0, then BasicGuider from sigma[1] on
    g0 = s.adaptive(0.0)
    out0, r["evals_t0"] = s.run(g0, 1)
    half, _ = s.run(cfgg, 1, sig=s.sigmas[:2])
    ref0, _ = s.run(basic, 1, sig=s.sigmas[1:], lat=half, zero_noise=True)
    r["t0_err"] = (out0 - ref0).abs().max().item()
    r["t0_cfg_steps"] = g0.stats.cfg_steps
    r["t0_vs_cfg"] = (out0 - ref).abs().max().item()
    # similarities seen under full CFG (threshold < 1 but never reached)
    gs = s.adaptive(0.999999)
    s.run(gs, 1)
    r["sims"] = gs.stats.similarities
    g99 = s.adaptive(0.99)
    _, r["evals_t099"] = s.run(g99, 1)
    _, r["evals_t099_seed2"] = s.run(g99, 2)
    r["t099_runs"] = [(st.cfg_steps, st.evaluations, st.switch_step) for st in g99.runs]
    gn = s.adaptive(1.0, no_cfg=2)
    s.run(gn, 1)
    s.run(gn, 5)
    r["no_cfg_runs"] = [st.cfg_steps for st in gn.runs]
    return r


def sampler_agreement(s: Sampling) -> dict:
    """The trainer's validation sampler and ComfyUI agree (same noise, schedule, algorithm)."""
    cases = {"agree": (0.99, 2, 0.0), "agree_uz": (0.99, 2, 1.5), "agree_full": (1.0, 0, 0.0)}
    vae = s.bundle.vae.config
    r = {}
    for name, (t, nc, uz) in cases.items():
        ga = s.adaptive(t, nc, uz)
        comfy_out, _ = s.run(ga, 7)
        st = GuidanceStats()
        embeds, negs = s.bundle.encode_prompts(["a red circle"]), s.bundle.encode_prompts(["blurry"])
        x, _ = sample_latents(s.bundle, embeds, width=64, height=64, steps=STEPS, guidance=3.5, seed=7,
                              negative_embeds=negs, guidance_real=CFG, no_cfg_steps=nc, cfg_threshold=t,
                              uncond_zero_scale=uz, stats=st)  # fmt: skip
        ours = x / vae.scaling_factor + vae.shift_factor
        r[name] = {"err": (comfy_out - ours).abs().max().item(), "scale": ours.abs().max().item(),
                   "comfy": [ga.stats.cfg_steps, ga.stats.evaluations], "ours": [st.cfg_steps, st.evaluations]}  # fmt: skip
    return r


def main() -> None:
    start_comfy(sys.argv[1])
    s = Sampling()
    print(json.dumps({**guider_numbers(s), **sampler_agreement(s)}))


if __name__ == "__main__":
    main()
