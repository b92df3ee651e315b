"""A transformer block run in ComfyUI's order of patch calls (attention.py's BasicTransformerBlock), for the host-free
tests of the garment term's hooks: norm1, the attn1_patch list, the attention (or the attn1 replacement), the
attn1_output_patch list, the residual, the middle_patch list."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from anydressing_core.attention import sdpa_attention


class Attention(nn.Module):
    def __init__(self, c: int, g: torch.Generator):
        super().__init__()
        self.to_q, self.to_k, self.to_v = (nn.Linear(c, c, bias=False) for _ in range(3))
        self.to_out = nn.Sequential(nn.Linear(c, c), nn.Dropout(0.0))
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) / c ** 0.5)


class Block(nn.Module):
    """The parts of a BasicTransformerBlock the garment term uses (norm1, attn1) and runs through."""

    def __init__(self, c: int = 8, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.norm1 = nn.LayerNorm(c)
        self.attn1 = Attention(c, g)


def run_block(block: Block, x: torch.Tensor, key, transformer_options: dict, heads: int,
              replace: Optional[callable] = None) -> torch.Tensor:
    """x + attn1(norm1(x)) with ComfyUI's patch calls; `replace` stands for an attn1 replacement (SAG, PAG, ...)."""
    patches = transformer_options.get("patches", {})
    extra = {k: v for k, v in transformer_options.items() if k not in ("patches", "patches_replace")}
    extra.update({"block": (key[0], key[1]), "block_index": key[2], "n_heads": heads, "dim_head": x.shape[-1] // heads,
                  "attn_precision": None})
    n = block.norm1(x)
    context = value = None
    if patches.get("attn1_patch"):
        context = value = n
        for p in patches["attn1_patch"]:
            n, context, value = p(n, context, value, extra)
    context = n if context is None else context
    value = context if value is None else value
    a = block.attn1
    q, k, v = a.to_q(n), a.to_k(context), a.to_v(value)
    out = replace(q, k, v, extra) if replace is not None else sdpa_attention(q, k, v, heads)
    n = a.to_out(out)
    for p in patches.get("attn1_output_patch", []):
        n = p(n, extra)
    x = n + x
    for p in patches.get("middle_patch", []):
        x = p(x, extra)
    return x
