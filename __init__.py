"""ComfyUI-AnyDressing: multi-garment virtual dressing (AnyDressing, CVPR 2025) as ComfyUI nodes.

ComfyUI imports this file from custom_nodes/<any folder name>/ and calls comfy_entrypoint (its V3 node API): six
nodes, listed in nodes/extension.py, one file each in nodes/.
"""

from .nodes.extension import AnyDressingExtension
from .nodes.model_folder import register_model_folder

register_model_folder()

WEB_DIRECTORY = "./web"  # per-node help pages: web/docs/<NodeId>.md


async def comfy_entrypoint() -> AnyDressingExtension:
    return AnyDressingExtension()


__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
