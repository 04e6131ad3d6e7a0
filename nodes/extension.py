"""The V3 extension ComfyUI asks for through `comfy_entrypoint` in the package's __init__.py."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

NODES: list[type[io.ComfyNode]] = []  # filled as node modules land (node-pack issue)


class TuneGraphExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)
