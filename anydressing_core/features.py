"""GARMENT_FEATURES: what GarmentsNet produced for one garment set, reused at every denoising step."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from .formats import TRAINING_FREE_STRENGTH
from .layers import LayerKey


@dataclass
class GarmentFeatures:
    """The 16 per-layer garment features of every garment (the self-attention inputs after norm1, or the GFE
    self-attention outputs F^new, as the GarmentsNet file's feature tap says), concatenated per layer along tokens.

    layers[key] is [1, L, C]; segments[key][k] is garment k's token range in it. dressing_weights[key] holds the
    Dressing-Attention W_k'/W_v' loaded with the GarmentsNet (None: use the MODEL's own to_k/to_v, the paper's
    initialisation, resolved when the MODEL is patched).
    """

    slots: list[str]
    layers: dict[LayerKey, torch.Tensor]
    segments: dict[LayerKey, list[tuple[int, int]]]
    dressing_weights: dict[LayerKey, tuple[Optional[torch.Tensor], Optional[torch.Tensor]]] = field(default_factory=dict)
    source: str = ""
    injection: str = "dressing"  # "dressing" (eq. 6), "concat" (MagicClothing), "separate" (DreamFit)
    uncond_default: bool = False  # whether the model's authors let the unconditional rows see the garments
    weighted_layers_only: bool = False  # garments enter only the layers with their own W_k'/W_v'
    strength: float = TRAINING_FREE_STRENGTH  # the lambda the GarmentsNet file is meant for: Apply's auto strength

    @property
    def count(self) -> int:
        return len(self.slots)

    def channels(self) -> dict[LayerKey, int]:
        return {k: int(v.shape[-1]) for k, v in self.layers.items()}

    def nbytes_per_garment(self) -> int:
        total = sum(t.numel() * t.element_size() for t in self.layers.values())
        return total // max(1, self.count)

    @staticmethod
    def from_batched(slots: list[str], captured: dict[LayerKey, torch.Tensor], **kwargs) -> "GarmentFeatures":
        """Build from per-layer captures [N, S, C] of one batched GarmentsNet pass (garment k = row k)."""
        layers, segments = {}, {}
        for key, t in captured.items():
            n, s, c = t.shape
            if n != len(slots):
                raise ValueError(f"layer {key} captured {n} rows for {len(slots)} garments")
            layers[key] = t.reshape(1, n * s, c)
            segments[key] = [(i * s, (i + 1) * s) for i in range(n)]
        return GarmentFeatures(slots=list(slots), layers=layers, segments=segments, **kwargs)

    def __deepcopy__(self, memo):
        return self  # immutable after creation; never duplicated by ModelPatcher.clone()
