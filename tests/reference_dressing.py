"""An independent garment term, for checking the pack's: forward hooks on each dressed block's attn1.to_q (keeps Q)
and attn1.to_out (adds W_out lambda G(Q)), with an explicit softmax over all garment tokens (eq. 6, no masks, every
row). It knows nothing of the pack's patches, run cache or row choice: it sees what the layer's own modules see."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from anydressing_core.layers import self_attention_blocks


def _garments(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, heads: int) -> torch.Tensor:
    b, lq, c = q.shape
    d = c // heads
    qh = q.reshape(b, lq, heads, d).transpose(1, 2).double()
    kh = keys.reshape(1, -1, heads, d).transpose(1, 2).double()
    vh = values.reshape(1, -1, heads, d).transpose(1, 2).double()
    p = torch.softmax(qh @ kh.transpose(-1, -2) / d ** 0.5, dim=-1)
    return (p @ vh).transpose(1, 2).reshape(b, lq, c).to(q.dtype)


@contextmanager
def reference_dressing(diffusion_model: torch.nn.Module, branch, strength: float):
    """While active, every self-attention layer the branch dresses adds its garment term through module hooks."""
    handles = []
    for key, block in self_attention_blocks(diffusion_model).items():
        layer = branch.layers.get(key)
        if layer is None:
            continue
        state: dict = {}

        def keep_q(module, args, out, state=state):
            state["q"] = out

        def add(module, args, out, state=state, layer=layer, block=block):
            q = state.pop("q", None)
            if q is None or q.shape[:2] != out.shape[:2]:
                return out
            with torch.no_grad():
                f = layer.features.to(device=q.device, dtype=q.dtype)
                g = _garments(q, block.attn1.to_k(f), block.attn1.to_v(f), block.attn1.heads)
                return out + torch.nn.functional.linear(strength * g, module.weight)

        handles.append(block.attn1.to_q.register_forward_hook(keep_q))
        handles.append(block.attn1.to_out[0].register_forward_hook(add))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
