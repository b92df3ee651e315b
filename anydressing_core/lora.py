"""Per-slot LoRA of the Garment-Specific Feature Extractor (paper eq. 3): W + scale * up @ down on attn1 q/k/v."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .layers import LayerKey


@dataclass
class LoRA:
    down: torch.Tensor  # [rank, in]
    up: torch.Tensor  # [out, rank]
    scale: float  # alpha / rank

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        down = self.down.to(device=x.device, dtype=x.dtype)
        up = self.up.to(device=x.device, dtype=x.dtype)
        return torch.matmul(torch.matmul(x, down.t()), up.t()) * self.scale

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


# slot -> layer -> projection ("q", "k", "v") -> LoRA
SlotLoRAs = dict[str, dict[LayerKey, dict[str, LoRA]]]
