"""Hooks that turn a plain SD1.5-architecture UNet into GarmentsNet for one batched pass at t = 0.

* capture (an attn1 pre-projection patch) sees each layer's self-attention input after norm1; under the
  "attn1_input" tap (what MagicClothing and IMAGDressing files were trained on) that is the garment feature.
* gfe_replace (an attn1 replacement) adds each row's slot LoRA to q/k/v (the Garment-Specific Feature Extractor),
  so garments of different slots share one batched pass while each attends only to itself (eq. 4). Under the
  "gfe_output" tap it keeps the LoRA'd self-attention output F^new (eq. 4-5, before to_out) as the garment feature,
  so every layer's LoRA shapes that layer's own feature (the last layer's included).
* zero_cross_attention removes cross-attention (the paper excises it): its output is zeroed, so text has no effect.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .layers import LayerKey
from .lora import SlotLoRAs

SelfAttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, dict], torch.Tensor]

TAP_INPUT = "attn1_input"  # the self-attention input after norm1 (files made before the tap was recorded)
TAP_OUTPUT = "gfe_output"  # F^new: the GFE self-attention output (eq. 4-5)
FEATURE_TAPS = (TAP_INPUT, TAP_OUTPUT)


def check_tap(tap: str) -> str:
    if tap not in FEATURE_TAPS:
        raise ValueError(f"feature tap must be one of {', '.join(FEATURE_TAPS)}, not {tap!r}")
    return tap


def extra_key(extra: dict) -> LayerKey:
    block = extra.get("block")
    if block is None:
        raise ValueError("the attention patch's options name no 'block' (ComfyUI passes (name, index) there)")
    return (block[0], int(block[1]), int(extra.get("block_index", 0)))


class GarmentEncodeHooks:
    def __init__(self, row_slots: list[str], loras: SlotLoRAs, self_attention: SelfAttentionFn,
                 tap: str = TAP_INPUT, on_layer: Optional[Callable[[], None]] = None):
        self.tap = check_tap(tap)
        self.on_layer = on_layer  # progress: called once per layer
        self.row_slots = list(row_slots)
        self.loras = loras
        self.self_attention = self_attention
        self.captured: dict[LayerKey, torch.Tensor] = {}
        self._last_n: Optional[torch.Tensor] = None
        groups: dict[str, list[int]] = {}
        for i, s in enumerate(self.row_slots):
            groups.setdefault(s, []).append(i)
        self.groups = groups

    def capture(self, n, context, value, extra):
        key = extra_key(extra)
        if self.tap == TAP_INPUT:
            self.captured[key] = n
        self._last_n = n
        if self.on_layer is not None:
            self.on_layer()
        return n, context, value

    def gfe_replace(self, q, k, v, extra):
        key = extra_key(extra)
        n = self._last_n
        if n is None or n.shape[0] != q.shape[0]:
            raise RuntimeError("GarmentsNet LoRA hook ran without the captured attention input")
        qkv = {"q": q, "k": k, "v": v}
        changed = {}
        for slot, rows in self.groups.items():
            layer = self.loras.get(slot, {}).get(key)
            if not layer:
                continue
            idx = torch.tensor(rows, device=q.device)
            n_rows = n.index_select(0, idx)
            for name, lora in layer.items():
                if name not in changed:
                    changed[name] = qkv[name].clone()
                changed[name].index_add_(0, idx, lora.delta(n_rows).to(q.dtype))
        q, k, v = changed.get("q", q), changed.get("k", k), changed.get("v", v)
        out = self.self_attention(q, k, v, extra)
        if self.tap == TAP_OUTPUT:
            self.captured[key] = out
        return out


def zero_cross_attention_replace(q, k, v, extra):
    """Skip the cross-attention computation (its result is discarded below)."""
    return torch.zeros_like(q)


def zero_cross_attention_output(n, extra):
    """Zero the cross-attention output after to_out (removes its bias too): no text reaches GarmentsNet."""
    return torch.zeros_like(n)
