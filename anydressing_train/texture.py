"""Garment-enhanced texture learning (paper §4.3, eq. 10-13), for t <= 350.

    x0_hat = (z_t - sqrt(1 - a_t) eps_hat) / sqrt(a_t),  I_hat = VAE-decode(x0_hat)                       (eq. 10)
    L_perc = 1/N sum_k D(I_hat * M_k, I * M_k)                                                           (eq. 12)
    L_high = 1/N sum_k || I_hat * M'_k - I * M'_k ||^2,  M'_k = M_k * Canny(I)                          (eq. 13)

D is a perceptual distance on VGG16 features (the backbone DISTS uses), with weights read from a file the user gives
(torchvision's `vgg16` state dict layout, features.<i>.weight/bias, as .safetensors); nothing is downloaded.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

# torchvision vgg16 "features": conv indices and where each stage ends (after its last ReLU)
_VGG16_CONVS = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
_VGG16_POOL_AFTER = (2, 7, 14, 21)  # conv indices followed by max-pooling
_STAGE_ENDS = (2, 7, 14, 21, 28)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class VGGFeatures(nn.Module):
    """VGG16's convolutional stages; weights from a state dict with torchvision's features.<i>.* keys."""

    def __init__(self, state_dict: dict[str, torch.Tensor]):
        super().__init__()
        self.convs = nn.ModuleDict()
        for i in _VGG16_CONVS:
            w, b = state_dict.get(f"features.{i}.weight"), state_dict.get(f"features.{i}.bias")
            if w is None or b is None:
                raise ValueError(f"perceptual network file lacks features.{i}.weight/bias (torchvision vgg16 layout)")
            conv = nn.Conv2d(w.shape[1], w.shape[0], w.shape[2], padding=w.shape[2] // 2)
            conv.weight.data.copy_(w.float())
            conv.bias.data.copy_(b.float())
            self.convs[str(i)] = conv
        self.requires_grad_(False)
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        """image [B, 3, H, W] in [0, 1] -> the input and the output of each of the 5 stages."""
        x = (image - self.mean) / self.std
        feats = [image]
        for i in _VGG16_CONVS:
            x = F.relu(self.convs[str(i)](x))
            if i in _STAGE_ENDS:
                feats.append(x)
            if i in _VGG16_POOL_AFTER:
                x = F.max_pool2d(x, 2)
        return feats


def perceptual_distance(net: VGGFeatures, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean over stages of the channel-normalised feature distance (0 for identical images)."""
    total = a.new_zeros(())
    fa, fb = net(a), net(b)
    for x, y in zip(fa, fb):
        x = x / (x.norm(dim=1, keepdim=True) + 1e-10)
        y = y / (y.norm(dim=1, keepdim=True) + 1e-10)
        total = total + ((x - y) ** 2).sum(dim=1).mean()
    return total / len(fa)


def canny(image: torch.Tensor, low: float = 0.1, high: float = 0.2, sigma: float = 1.0) -> torch.Tensor:
    """Canny edges of [B, 3, H, W] in [0, 1] -> [B, 1, H, W] in {0, 1}: Gaussian blur, Sobel gradients,
    non-maximum suppression along the gradient direction, double threshold and hysteresis."""
    gray = (0.299 * image[:, 0] + 0.587 * image[:, 1] + 0.114 * image[:, 2]).unsqueeze(1)
    radius = max(1, int(math.ceil(2 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=image.dtype, device=image.device)
    k = torch.exp(-(t ** 2) / (2 * sigma * sigma))
    k = k / k.sum()
    g = F.conv2d(F.pad(gray, (radius, radius, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    g = F.conv2d(F.pad(g, (0, 0, radius, radius), mode="replicate"), k.view(1, 1, -1, 1))
    sx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=image.dtype, device=image.device)
    padded = F.pad(g, (1, 1, 1, 1), mode="replicate")
    gx = F.conv2d(padded, sx.view(1, 1, 3, 3))
    gy = F.conv2d(padded, sx.t().contiguous().view(1, 1, 3, 3))
    mag = torch.sqrt(gx ** 2 + gy ** 2)
    angle = torch.rad2deg(torch.atan2(gy, gx)) % 180
    # neighbours along the gradient, in 4 directions (0, 45, 90, 135 degrees)
    m = F.pad(mag, (1, 1, 1, 1))
    h, w = mag.shape[-2:]

    def at(dy, dx):
        return m[..., 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]

    d0 = (angle < 22.5) | (angle >= 157.5)
    d45 = (angle >= 22.5) & (angle < 67.5)
    d90 = (angle >= 67.5) & (angle < 112.5)
    d135 = (angle >= 112.5) & (angle < 157.5)
    keep = (d0 & (mag >= at(0, -1)) & (mag >= at(0, 1))) | (d45 & (mag >= at(-1, 1)) & (mag >= at(1, -1))) | \
           (d90 & (mag >= at(-1, 0)) & (mag >= at(1, 0))) | (d135 & (mag >= at(-1, -1)) & (mag >= at(1, 1)))
    thin = mag * keep
    peak = thin.amax(dim=(-2, -1), keepdim=True).clamp_min(1e-8)
    strong = thin >= high * peak
    weak = (thin >= low * peak) & ~strong
    edges = strong.float()
    for _ in range(max(h, w)):  # hysteresis: weak pixels connected to strong ones
        grown = (F.max_pool2d(edges, 3, stride=1, padding=1) > 0) & weak
        new = (edges > 0) | grown
        if bool((new.float() == edges).all()):
            break
        edges = new.float()
    return edges


def texture_loss(decode, x_t: torch.Tensor, eps_hat: torch.Tensor, alpha_bar: torch.Tensor, target: torch.Tensor,
                 masks: torch.Tensor, net: Optional[VGGFeatures]) -> dict[str, torch.Tensor]:
    """Eq. 10-13 for one sample. decode: scaled latents -> [B, 3, H, W] in [0, 1], differentiable.
    target [1, 3, H, W] in [0, 1]; masks [N, H, W] (garments in the target)."""
    x0_hat = (x_t - (1 - alpha_bar).sqrt() * eps_hat) / alpha_bar.sqrt()
    image = decode(x0_hat)
    m = masks.unsqueeze(1).to(image.dtype)
    n = masks.shape[0]
    out = {}
    if net is not None:
        out["perceptual"] = sum(perceptual_distance(net, image * m[k:k + 1], target * m[k:k + 1])
                                for k in range(n)) / n
    edges = canny(target)
    high = m * edges
    out["highfreq"] = sum(((image * high[k:k + 1] - target * high[k:k + 1]) ** 2).mean() for k in range(n)) / n
    return out
