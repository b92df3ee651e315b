"""The perceiver resampler that turns CLIP image features into a garment UNet's cross-attention context.

IMAGDressing-v1 feeds its garment UNet this context (the IP-Adapter-Plus shape: learned queries that attend to the
image tokens and to themselves, with feed-forward blocks). The sizes are read from the weights:
  latents [1, queries, dim]; proj_in [dim, embedding]; layers.<i>.0 = attention (norm1, norm2, to_q, to_kv, to_out);
  layers.<i>.1 = feed-forward (0: LayerNorm, 1: Linear up, 3: Linear down); proj_out [output, dim]; norm_out.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from .native_format import FormatError


class _PerceiverAttention(nn.Module):
    def __init__(self, dim: int, inner: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, image_tokens: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x = self.norm1(image_tokens)
        lat = self.norm2(latents)
        q = self.to_q(lat)
        k, v = self.to_kv(torch.cat([x, lat], dim=1)).chunk(2, dim=-1)
        b, n, inner = q.shape
        d = inner // self.heads

        def heads(t):
            return t.reshape(b, t.shape[1], self.heads, d).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v))  # softmax(q k^T / sqrt(d)) v
        return self.to_out(out.transpose(1, 2).reshape(b, n, inner))


class Resampler(nn.Module):
    def __init__(self, queries: int, dim: int, embedding: int, output: int, depth: int, inner: int, ff_inner: int,
                 dim_head: int = 64):
        super().__init__()
        self.latents = nn.Parameter(torch.zeros(1, queries, dim))
        self.proj_in = nn.Linear(embedding, dim)
        self.proj_out = nn.Linear(dim, output)
        self.norm_out = nn.LayerNorm(output)
        self.layers = nn.ModuleList()
        for _ in range(depth):
            ff = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, ff_inner, bias=False), nn.GELU(),
                               nn.Linear(ff_inner, dim, bias=False))
            self.layers.append(nn.ModuleList([_PerceiverAttention(dim, inner, max(1, inner // dim_head)), ff]))

    def forward(self, image_tokens: torch.Tensor) -> torch.Tensor:
        latents = self.latents.expand(image_tokens.shape[0], -1, -1)
        x = self.proj_in(image_tokens)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))

    @property
    def embedding_dim(self) -> int:
        return int(self.proj_in.in_features)


def resampler_from_weights(sd: dict[str, torch.Tensor], name: str = "file") -> Resampler:
    """Build a Resampler whose sizes come from its weights (keys without the 'proj.' prefix)."""
    try:
        queries, dim = int(sd["latents"].shape[1]), int(sd["latents"].shape[2])
        embedding = int(sd["proj_in.weight"].shape[1])
        output = int(sd["proj_out.weight"].shape[0])
        depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"layers\.(\d+)\.", k)))
        inner = int(sd["layers.0.0.to_q.weight"].shape[0])
        ff_inner = int(sd["layers.0.1.1.weight"].shape[0])
    except (KeyError, ValueError) as e:
        raise FormatError(f"{name}: the image projection (resampler) weights are incomplete ({e})") from None
    model = Resampler(queries, dim, embedding, output, depth, inner, ff_inner)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise FormatError(f"{name}: resampler weights do not fit (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval()

