"""MultiCond: balance several conditions in one diffusion run (ComfyUI node pack).

ComfyUI imports this package and calls `comfy_entrypoint`; nothing here imports comfy at import
time, so the same package also serves as a Python library on diffusers (`multicond.core`).
"""

__version__ = "0.1.0"
WEB_DIRECTORY = "./web"  # help pages of the nodes (web/docs/<node id>.md)


async def comfy_entrypoint():  # noqa: ANN201 - the return type lives in comfy_api
    from .nodes.extension import MultiCondExtension

    return MultiCondExtension()
