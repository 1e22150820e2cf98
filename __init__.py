"""TexForce for ComfyUI: reinforcement learning on the text encoder, from the node graph.

Importing this package does nothing heavy: ComfyUI calls `comfy_entrypoint`, which imports the nodes.
"""

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes import TexForceExtension

    return TexForceExtension()
