"""ComfyUI-AnyDressing: multi-garment virtual dressing (AnyDressing, CVPR 2025) as ComfyUI nodes.

ComfyUI imports this file from custom_nodes/<any folder name>/ and reads NODE_CLASS_MAPPINGS.
"""

from .nodes.node_classes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, register_model_folder

register_model_folder()

WEB_DIRECTORY = "./web"  # per-node help pages: web/docs/<NodeId>.md

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
