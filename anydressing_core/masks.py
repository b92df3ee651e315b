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


def grow(masks: torch.Tensor, pixels: int) -> torch.Tensor:
    """[N, H, W]: grow (pixels > 0) or shrink (pixels < 0) each mask by a square structuring element."""
    if pixels == 0:
        return masks
    k = 2 * abs(pixels) + 1
    x = masks.unsqueeze(1)
    if pixels > 0:
        x = F.max_pool2d(x, k, stride=1, padding=abs(pixels))
    else:
        x = -F.max_pool2d(-x, k, stride=1, padding=abs(pixels))
    return x.squeeze(1)


def feather(masks: torch.Tensor, pixels: int) -> torch.Tensor:
    """[N, H, W]: soften edges with a Gaussian of sigma = pixels / 2 (0 leaves masks unchanged)."""
    if pixels <= 0:
        return masks
    sigma = pixels / 2.0
    radius = int(pixels)
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(t ** 2) / (2 * sigma * sigma))
    kernel = (kernel / kernel.sum()).to(masks.dtype)
    x = masks.unsqueeze(1)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))
    return x.squeeze(1).clamp(0.0, 1.0)
