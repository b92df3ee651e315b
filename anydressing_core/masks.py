"""Garment masks: one [H, W] map per garment, values in [0, 1], resized to each attention layer's token grid."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def normalize_masks(masks: torch.Tensor) -> torch.Tensor:
    """Accept [N, H, W] or [H, W]; return float32 [N, H, W] clamped to [0, 1]; refuse NaN/inf."""
    if masks.dim() == 2:
        masks = masks.unsqueeze(0)
    if masks.dim() != 3:
        raise ValueError(f"garment masks must be [N, H, W]; got shape {tuple(masks.shape)}")
    masks = masks.float()
    if not bool(torch.isfinite(masks).all()):
        raise ValueError("garment masks contain NaN or infinite values")
    return masks.clamp(0.0, 1.0)


def resize_to_grid(masks: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[N, H, W] -> [N, height*width] for a layer whose tokens form a height x width grid.

    Area averaging when shrinking keeps a soft mask's mass; bilinear when growing. Exact zeros stay zero, so an
    all-zero mask stays all-zero at every layer.
    """
    n, h, w = masks.shape
    if (h, w) == (height, width):
        out = masks
    elif height <= h and width <= w:
        out = F.interpolate(masks.unsqueeze(1), size=(height, width), mode="area").squeeze(1)
    else:
        out = F.interpolate(masks.unsqueeze(1), size=(height, width), mode="bilinear", align_corners=False).squeeze(1)
    return out.clamp(0.0, 1.0).reshape(n, height * width)
