"""The pack as a ComfyUI V3 extension: its nodes, registered under their saved-workflow IDs."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .apply_dressing_attention import ApplyDressingAttention
from .encode_garments import EncodeGarments
from .garment_attention_maps import GarmentAttentionMaps
from .garment_guidance import GarmentGuidance
from .garment_masks import GarmentMasksNode
from .load_garments_net import LoadGarmentsNet

NODES: list[type[io.ComfyNode]] = [LoadGarmentsNet, EncodeGarments, ApplyDressingAttention, GarmentMasksNode,
                                   GarmentAttentionMaps, GarmentGuidance]


class AnyDressingExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)
