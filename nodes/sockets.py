"""TuneGraph's socket types (custom types are prefixed TUNEGRAPH_) and the node category."""

from __future__ import annotations

from comfy_api.latest import io

CATEGORY = "TuneGraph"

ModelSocket = io.Custom("TUNEGRAPH_MODEL")
DatasetsSocket = io.Custom("TUNEGRAPH_DATASETS")
CacheSocket = io.Custom("TUNEGRAPH_CACHE")
AdapterSocket = io.Custom("TUNEGRAPH_ADAPTER")
