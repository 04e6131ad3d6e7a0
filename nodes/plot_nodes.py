"""PlotLoss: a run's loss curve (metrics.jsonl) as an IMAGE, to save with the outputs."""

from __future__ import annotations

import tempfile
from pathlib import Path

from comfy_api.latest import io, ui

from ..trainer.errors import ConfigError
from ..trainer.training.metrics import METRICS_FILE, read_metrics
from ..trainer.training.plot import plot_loss
from . import paths
from .handles import AdapterHandle
from .sockets import CATEGORY, AdapterSocket
from .train_nodes import image_tensor


def run_folder(adapter: AdapterHandle | None, run_name: str) -> Path:
    """The run to plot: the adapter's training folder, else output/tunegraph/<run_name>."""
    if adapter is not None and adapter.output_dir is not None:
        return Path(adapter.output_dir)
    if run_name.strip():
        return paths.output_path(str(Path("tunegraph") / run_name.strip()), "PlotLoss: run_name")
    raise ConfigError(
        "PlotLoss: connect an adapter from TrainLoKr or give run_name (TrainLoKr's output_name)"
    )


def render_loss_plot(run_dir: Path, *, smoothing: float, log_scale: bool, title: str):
    """The loss plot of `run_dir` as ComfyUI's IMAGE tensor [1,H,W,3]."""
    metrics_path = run_dir / METRICS_FILE
    if not metrics_path.is_file():
        raise ConfigError(f"PlotLoss: {metrics_path} does not exist; has that run trained a step yet?")
    with tempfile.TemporaryDirectory() as tmp:
        png = plot_loss(
            read_metrics(metrics_path),
            Path(tmp) / "loss.png",
            title=title or f"Training loss: {run_dir.name}",
            smoothing=smoothing,
            log_scale=log_scale,
        )
        return image_tensor(png)


class PlotLoss(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TuneGraphPlotLoss",
            display_name="Plot Loss",
            category=CATEGORY,
            description="Render a training run's loss curve (raw, smoothed, eval loss) as an image.",
            is_output_node=True,
            inputs=[
                AdapterSocket.Input("adapter", optional=True, tooltip="a TrainLoKr output: plot its run"),
                io.String.Input("run_name", default="", tooltip="or: a run folder under output/tunegraph"),
                io.Float.Input("smoothing", default=0.9, min=0.0, max=0.999, step=0.01),
                io.Boolean.Input("log_scale", default=False),
                io.String.Input("title", default=""),
            ],
            outputs=[io.Image.Output(display_name="loss_plot")],
        )

    @classmethod
    def fingerprint_inputs(cls, adapter=None, run_name: str = "", **_kw) -> str:
        # re-render when the run's metrics changed, even if the inputs did not
        try:
            metrics = run_folder(adapter, run_name) / METRICS_FILE
            return f"{metrics}:{metrics.stat().st_mtime_ns}"
        except (ConfigError, OSError):
            return ""

    @classmethod
    def execute(
        cls,
        run_name: str,
        smoothing: float,
        log_scale: bool,
        title: str,
        adapter: AdapterHandle | None = None,
    ) -> io.NodeOutput:
        run_dir = run_folder(adapter, run_name)
        image = render_loss_plot(run_dir, smoothing=smoothing, log_scale=log_scale, title=title)
        return io.NodeOutput(image, ui=ui.PreviewImage(image, cls=cls))
