"""TuneGraph: what ComfyUI imports. The node list (V3 entrypoint) and WEB_DIRECTORY; nothing else.

Importing the package outside ComfyUI (the `tunegraph` CLI, pip) must not touch ComfyUI, so the
node modules are only imported when ComfyUI asks for the extension.
"""

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes.extension import TuneGraphExtension

    return TuneGraphExtension()


__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
