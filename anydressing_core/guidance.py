"""Joint garment guidance (MagicClothing's three-row CFG), on denoised predictions.

    x0 = u + s_g (g - u) + s_t (t - g)
u: negative text, no garment; g: negative text with the garments; t: positive text with the garments.
s_t is the sampler's cfg (text scale), s_g the garment scale. s_g = s_t gives back plain CFG of t against u.
"""

from __future__ import annotations

import torch


def joint_guidance(t: torch.Tensor, u: torch.Tensor, g: torch.Tensor, text_scale: float,
                   garment_scale: float) -> torch.Tensor:
    return u + garment_scale * (g - u) + text_scale * (t - g)
