"""The V3 extension ComfyUI asks for through `comfy_entrypoint` in the package's __init__.py."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .adapter_nodes import ApplyAdapter, SaveAdapter
from .bridge_nodes import DecodeLatents, EncodePrompt, ToComfyModel
from .data_nodes import CacheLatents, DemoDataset, LoadDatasetBackend
from .guider_nodes import AdaptiveGuider
from .loader_nodes import LoadDiffusionModel
from .model_nodes import LoadTrainingModel, QuantizeModel
from .plot_nodes import PlotLoss
from .sample_nodes import ValidateSamples
from .train_nodes import TrainLoKr

NODES: list[type[io.ComfyNode]] = [
    LoadTrainingModel,
    QuantizeModel,
    LoadDatasetBackend,
    DemoDataset,
    CacheLatents,
    TrainLoKr,
    ValidateSamples,
    SaveAdapter,
    ApplyAdapter,
    ToComfyModel,
    EncodePrompt,
    DecodeLatents,
    AdaptiveGuider,
    LoadDiffusionModel,
    PlotLoss,
]


class TuneGraphExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        from .web_routes import register

        # ComfyUI 0.3.75 never calls on_load; this runs before the server adds its route table
        register()  # the web panel's routes (once per server)
        return list(NODES)
