"""AdaptiveGuider: a GUIDER for SamplerCustomAdvanced that runs real CFG only while it matters.

The algorithm is the trainer's (`trainer/training/guidance.py`), so ComfyUI inference and the
trainer's validation images agree. Differences from the community AdaptiveGuidance node, on purpose:
the initial no-CFG steps come from the sigma schedule (not a call counter that survives between runs),
the state is fresh for every sampling run (a new seed gives the same CFG-step count), cond and uncond
are batched in CFGGuider's order ([positive, negative]), and uncond-zero edits no sampler tensor.
"""

from __future__ import annotations

import logging
from typing import Any

import comfy.samplers
from comfy_api.latest import io

from ..trainer.training.guidance import AdaptiveCFG, GuidanceStats, adaptive_cfg
from .sockets import CATEGORY

log = logging.getLogger("tunegraph")


class AdaptiveCFGGuider(comfy.samplers.CFGGuider):
    """CFGGuider with adaptive CFG. `stats` is the current (or last) run's GuidanceStats; `runs`
    keeps every finished run's, for tests and the node's report."""

    def __init__(self, model_patcher: Any, settings: AdaptiveCFG, node_id: str | None = None):
        super().__init__(model_patcher)
        self.settings = settings
        self.cfg = settings.cfg
        self.node_id = node_id
        self.stats = GuidanceStats()
        self.runs: list[GuidanceStats] = []

    def sample(self, *args: Any, **kwargs: Any):
        self.stats = GuidanceStats()  # a new object per run: state never leaks into the next seed
        try:
            return super().sample(*args, **kwargs)
        finally:
            self.runs.append(self.stats)
            self._report()

    def predict_noise(self, x, timestep, model_options: dict | None = None, seed=None):
        model_options = model_options or {}
        positive, negative = self.conds.get("positive"), self.conds.get("negative")
        sigmas = model_options.get("transformer_options", {}).get("sample_sigmas")
        sigma = float(timestep.flatten()[0])
        if sigmas is None:  # called outside a sampler run: no schedule, treat it as its first step
            sigmas = [sigma]

        def predict(with_uncond: bool):
            conds = [positive, negative if with_uncond else None]
            out = comfy.samplers.calc_cond_batch(self.inner_model, conds, x, timestep, model_options)
            for fn in model_options.get("sampler_pre_cfg_function", []) if with_uncond else []:
                out = fn({"conds": conds, "conds_out": out, "cond_scale": self.cfg, "timestep": timestep,
                          "input": x, "sigma": timestep, "model": self.inner_model,
                          "model_options": model_options})  # fmt: skip
            return out[0], (out[1] if with_uncond else None)

        def combine(cond, uncond):  # exactly CFGGuider's combination, hooks included
            return comfy.samplers.cfg_function(self.inner_model, cond, uncond, self.cfg, x, timestep,
                                               model_options=model_options, cond=positive, uncond=negative)  # fmt: skip

        return adaptive_cfg(self.settings, self.stats, sigma, sigmas, predict, origin=x, combine=combine)

    def _report(self) -> None:
        text = f"AdaptiveGuider: {self.stats.summary()}"
        log.info(text)
        if self.node_id is None:
            return
        try:
            from server import PromptServer

            PromptServer.instance.send_progress_text(text, self.node_id)
        except Exception:  # no server (scripts, tests): the log line is the report
            pass


class AdaptiveGuider(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TuneGraphAdaptiveGuider",
            display_name="Adaptive Guider (TuneGraph)",
            category=CATEGORY,
            description="Real CFG for SamplerCustomAdvanced that switches itself off once the positive and "
            "negative predictions agree (cosine similarity >= threshold), for the remaining lower-noise "
            "steps; the first no_cfg_steps of the schedule run without CFG. threshold 1.0 and "
            "no_cfg_steps 0 is exactly CFGGuider. The same algorithm as the trainer's validation.",
            inputs=[
                io.Model.Input("model"),
                io.Conditioning.Input("positive"),
                io.Conditioning.Input("negative"),
                io.Float.Input("cfg", default=3.5, min=0.0, max=100.0, step=0.1, round=0.01),
                io.Float.Input("threshold", default=0.99, min=0.0, max=1.0, step=0.001, round=0.0001),
                io.Int.Input(
                    "no_cfg_steps",
                    default=0,
                    min=0,
                    max=1000,
                    tooltip="schedule steps at the start (highest sigmas) that run without CFG",
                ),
                io.Float.Input(
                    "uncond_zero_scale",
                    default=0.0,
                    min=0.0,
                    max=10.0,
                    step=0.01,
                    tooltip="after CFG switched off: > 0 guides against the prediction's mean",
                ),
            ],  # fmt: skip
            outputs=[io.Guider.Output()],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, positive, negative, cfg: float, threshold: float, no_cfg_steps: int,
                uncond_zero_scale: float) -> io.NodeOutput:  # fmt: skip
        settings = AdaptiveCFG(cfg, threshold, no_cfg_steps, uncond_zero_scale)
        node_id = getattr(cls.hidden, "unique_id", None) if getattr(cls, "hidden", None) else None
        guider = AdaptiveCFGGuider(model, settings, node_id)
        guider.set_conds(positive, negative)
        return io.NodeOutput(guider)
