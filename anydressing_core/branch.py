"""Dressing-Attention's garment term, one branch per Apply Dressing-Attention node: O = SelfAttn(Q,K,V) + sum over
branches of lambda * G (paper eq. 6 with the masked semantics of decisions.md).

A *branch* holds one Apply node's garments, lambda, weights, masks, schedule and uncond setting. How the term
reaches the MODEL's layers (patch lists every pack appends to) is anydressing_core.hooks.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch

from .attention import AttentionFn, garment_attention, garment_attention_mass, sdpa_attention, visible_queries
from .layers import LayerKey, format_key
from .masks import resize_to_grid
from .run_state import (GARMENT_ROWS_KEY, GARMENT_UUIDS_KEY, PROBE_KEY, RUN_CACHE_KEY, WEIGHTS_GENERATION_KEY,
                        RunCache, WeightsGeneration)

Projection = Union[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]
SelfAttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, dict], torch.Tensor]

@dataclass(eq=False)
class DressingLayer:
    """Garment tokens of one self-attention layer and the projections W_k', W_v' that turn them into K', V'."""

    features: torch.Tensor  # [1, L, C]
    segments: list[tuple[int, int]]
    key_proj: Projection
    value_proj: Projection

    def project(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features.to(device=device, dtype=dtype)
        return _apply(self.key_proj, f), _apply(self.value_proj, f)

    def weights_version(self) -> tuple:
        """Identity and in-place version of the projection weights: it changes when the host swaps or patches them.

        Scheduled LoRA hooks (hook keyframes) re-patch to_k/to_v mid-run, per step and per cond; K'/V' projected
        with the old weights must then be projected again.
        """
        out = []
        for proj in (self.key_proj, self.value_proj):
            w = proj if isinstance(proj, torch.Tensor) else getattr(proj, "weight", None)
            out.append((id(w), w.data_ptr(), _version(w)) if isinstance(w, torch.Tensor) else None)
        return tuple(out)


def _version(w: torch.Tensor) -> int:
    try:
        return int(w._version)
    except RuntimeError:  # inference-mode tensors keep no version counter (ComfyUI samples under inference_mode)
        return -1


def _apply(proj: Projection, f: torch.Tensor) -> torch.Tensor:
    if isinstance(proj, torch.Tensor):
        return torch.matmul(f, proj.to(device=f.device, dtype=f.dtype).t())
    return proj(f)


def layer_grid(extra: dict, tokens: int) -> tuple[int, int]:
    """(h, w) of the current layer's token grid, from activations_shape, else from the latent's aspect ratio."""
    shape = extra.get("activations_shape")
    if shape is not None and len(shape) >= 4 and int(shape[-2]) * int(shape[-1]) == tokens:
        return int(shape[-2]), int(shape[-1])
    orig = extra.get("original_shape")
    if orig is not None and len(orig) >= 4:
        oh, ow = int(orig[-2]), int(orig[-1])
        ratio = math.sqrt(oh * ow / tokens)
        for h in (round(oh / ratio), math.ceil(oh / ratio), math.floor(oh / ratio)):
            if h > 0 and tokens % h == 0:
                return h, tokens // h
    raise ValueError(f"cannot tell the token grid of a layer with {tokens} tokens")


class DressingBranch:
    """One set of garments attended from every patched layer, with its lambda, weights, masks and schedule."""

    def __init__(self, layers: dict[LayerKey, DressingLayer], strength: float = 0.7,
                 weights: Optional[Sequence[float]] = None, masks: Optional[torch.Tensor] = None,
                 sigma_start: float = float("inf"), sigma_end: float = 0.0, include_uncond: bool = False,
                 attention: AttentionFn = sdpa_attention, mode: str = "dressing"):
        self.layers = layers
        self.strength = float(strength)
        self.weights = None if weights is None else tuple(float(w) for w in weights)
        self.masks = masks  # [N, H, W] float in [0, 1] or None
        self.sigma_start = float(sigma_start)
        self.sigma_end = float(sigma_end)
        self.include_uncond = bool(include_uncond)
        self.attention = attention
        if mode not in ("dressing", "concat", "separate"):
            raise ValueError(f"unknown injection mode {mode!r}")
        if mode == "concat" and (masks is not None or self.weights is not None):
            raise ValueError("garment masks and weights need Dressing-Attention weights; concat-mode files "
                             "(MagicClothing) join all garment tokens to the latent tokens instead")
        self.mode = mode
        self.full_schedule = self.sigma_start >= 1e8 and self.sigma_end <= 0.0

    def __deepcopy__(self, memo):
        return self  # immutable; ModelPatcher.clone() must not duplicate garment tensors

    def active_at(self, extra: dict) -> bool:
        if self.strength == 0.0:
            return False
        if self.full_schedule:
            return True
        sigmas = extra.get("sigmas")
        if sigmas is None:
            return True
        sigma = float(sigmas.detach().max())
        return self.sigma_end <= sigma <= self.sigma_start

    def rows(self, extra: dict, batch: int) -> list[tuple[int, int]]:
        """Row ranges that see the garments, chosen by the conditioning each chunk of rows comes from.

        ComfyUI passes, per chunk, cond_or_uncond (the chunk's place in the list its caller passed) and uuids (the
        identity of its conditioning). The sampling wrapper publishes the identities of the run's positive
        conditioning (GARMENT_UUIDS_KEY), so another node's extra pass with the negative alone (Self-Attention
        Guidance) is not dressed and one with the positive (Perturbed-Attention Guidance) is. Without identities
        (the model called outside a sampling run) cond_or_uncond 0 means the positive.
        """
        cou = extra.get("cond_or_uncond")
        if not cou:
            return [(0, batch)]
        per = batch // len(cou)
        uuids = extra.get("uuids")
        dressed_ids = extra.get(GARMENT_UUIDS_KEY)
        by_identity = dressed_ids is not None and uuids is not None and len(uuids) == len(cou)
        fallback = extra.get(GARMENT_ROWS_KEY, (0,))
        out = []
        for i, c in enumerate(cou):
            seen = uuids[i] in dressed_ids if by_identity else c in fallback
            if seen or self.include_uncond:
                out.append((i * per, (i + 1) * per))
        return out

    def projected(self, key: LayerKey, layer: DressingLayer, device, dtype, cache: Optional[RunCache],
                  generation: Optional[WeightsGeneration] = None):
        if cache is None:
            return layer.project(device, dtype)
        ck = ("kv", id(self), key, str(device), dtype)
        version = (layer.weights_version(), generation.value if generation is not None else 0)
        hit = cache.get(ck)
        if hit is None or hit[0] != version:  # one entry per layer: the projection for the weights loaded now
            hit = (version, layer.project(device, dtype))
            cache[ck] = hit
        return hit[1]

    def check_mask_size(self, extra: dict) -> None:
        """Masks must have the generated image's aspect ratio (any resolution), else regions land in wrong places."""
        orig = extra.get("original_shape")
        if self.masks is None or orig is None or len(orig) < 4:
            return
        lh, lw = int(orig[-2]), int(orig[-1])
        mh, mw = int(self.masks.shape[-2]), int(self.masks.shape[-1])
        ratio_m, ratio_l = mh / mw, lh / lw
        if abs(ratio_m - ratio_l) > ratio_l * (1.0 / lh + 1.0 / lw) + 0.01:  # a latent pixel of rounding is fine
            raise ValueError(f"[AnyDressing] Apply Dressing-Attention: the garment masks are {mw}x{mh} (WxH) but "
                             f"the image being generated is {lw * 8}x{lh * 8} (latent {lw}x{lh}); make the masks the "
                             f"size of the generated image")

    def check_full_grid(self, key: LayerKey, q: torch.Tensor, extra: dict, cache: Optional[RunCache]) -> None:
        """Masks are placed on the whole image's token grid; refuse a layer that sees tiles, merged tokens or a crop.

        HyperTile tiles q (more rows, fewer tokens), ToMe merges tokens (fewer tokens), area conditioning runs the
        model on a crop of the latent: in each case a mask position would land on the wrong query.
        """
        act = extra.get("activations_shape")
        if act is not None and len(act) >= 4:
            h, w = int(act[-2]), int(act[-1])
            if q.shape[1] != h * w or q.shape[0] != int(act[0]):
                raise ValueError(
                    f"[AnyDressing] Apply Dressing-Attention: layer {format_key(key)} receives {q.shape[0]} row(s) of "
                    f"{q.shape[1]} tokens, not {int(act[0])} row(s) of its {w}x{h} grid: another pack's attention "
                    f"patch, put in front of the pack's own, tiles or merges the tokens, and garment masks cannot "
                    f"follow them. Disconnect garment_masks, or apply that pack's node before Apply Dressing-Attention")
        full = cache.get("latent_shape") if cache is not None else None
        orig = extra.get("original_shape")
        if full is not None and orig is not None and len(orig) >= 4 and tuple(orig[-2:]) != tuple(full[-2:]):
            raise ValueError(
                f"[AnyDressing] Apply Dressing-Attention: the model runs on a {orig[-1]}x{orig[-2]} crop of the "
                f"{full[-1]}x{full[-2]} latent (area conditioning, e.g. ConditioningSetArea or ConditioningSetMask "
                f"with set_cond_area 'mask bounds'), and garment masks cover the whole image. Disconnect "
                f"garment_masks, or use ConditioningSetMask with set_cond_area 'default'")

    def layer_masks(self, extra: dict, tokens: int, device, cache: Optional[RunCache]) -> Optional[torch.Tensor]:
        if self.masks is None:
            return None
        h, w = layer_grid(extra, tokens)
        if cache is None or ("mask_checked", id(self)) not in cache:
            self.check_mask_size(extra)
            if cache is not None:
                cache[("mask_checked", id(self))] = True
        ck = ("mask", id(self), h, w, str(device))
        if cache is not None and ck in cache:
            return cache[ck]
        m = resize_to_grid(self.masks, h, w).to(device)
        if cache is not None:
            cache[ck] = m
        return m

    def context_tokens(self, key: LayerKey, n: torch.Tensor, extra: dict
                       ) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """Concat mode (MagicClothing): garment tokens to join to the layer's context and value before the layer's own
        to_k/to_v, [B, L, C] each; None when inactive.

        Rows that see the garments get F (values scaled by the strength: to_v has no bias, so to_v(sF) = s F W_v);
        the other rows get zero tokens, as MagicClothing gives its unconditional rows (to_k(0) = to_v(0) = 0).
        """
        layer = self.layers.get(key)
        if self.mode != "concat" or layer is None or not self.active_at(extra):
            return None
        ranges = self.rows(extra, n.shape[0])
        if not ranges:
            return None
        f = layer.features.to(device=n.device, dtype=n.dtype)
        k_add = n.new_zeros((n.shape[0], f.shape[1], f.shape[2]))
        v_add = n.new_zeros((n.shape[0], f.shape[1], f.shape[2]))
        for start, end in _merge(ranges):
            k_add[start:end] = f
            v_add[start:end] = f * self.strength
        return k_add, v_add

    @staticmethod
    def any_visible(masks: torch.Tensor) -> bool:
        """Whether any query of this grid sees a garment (a host sync: only used without a run cache)."""
        return bool((masks > 0).any())

    def visible(self, masks: torch.Tensor, grid: tuple[int, int], cache: Optional[RunCache]
                ) -> Optional[list[torch.Tensor]]:
        """Per garment, the queries of this grid that see it, once per grid and run (its one host sync).

        Lets each garment be attended only where its mask is, so disjoint masks cost about one garment's attention.
        Without a run cache (no sampling wrapper) it would sync at every call, so the dense masked path is used.
        Keyed by the grid itself: two grids with the same token count (8x2 and 4x4) have different queries.
        """
        if cache is None:
            return None
        ck = ("visible", id(self), tuple(grid), str(masks.device))
        if ck not in cache:
            cache[ck] = visible_queries(masks)
        return cache[ck]

    def output(self, key: LayerKey, q: torch.Tensor, extra: dict) -> Optional[list[tuple[int, int, torch.Tensor]]]:
        """lambda * G for the rows that see garments, as (start, end, tensor) pieces; None when inactive here."""
        layer = self.layers.get(key)
        if self.mode == "concat" or layer is None or not self.active_at(extra):
            return None
        ranges = self.rows(extra, q.shape[0])
        if not ranges:
            return None
        cache = extra.get(RUN_CACHE_KEY)
        if self.masks is not None:
            self.check_full_grid(key, q, extra, cache)
        masks = self.layer_masks(extra, q.shape[1], q.device, cache)
        visible = None if masks is None else self.visible(masks, layer_grid(extra, q.shape[1]), cache)
        if masks is not None:  # no query sees any garment: exactly the unpatched layer
            seen = any(v.numel() for v in visible) if visible is not None else self.any_visible(masks)
            if not seen:
                return None
        kp, vp = self.projected(key, layer, q.device, q.dtype, cache, extra.get(WEIGHTS_GENERATION_KEY))
        heads = int(extra.get("n_heads") or 1)
        pieces = []
        probe = extra.get(PROBE_KEY)
        attention = functools.partial(self.attention, transformer_options=extra)
        for start, end in _merge(ranges):
            g = garment_attention(q[start:end], kp, vp, heads, layer.segments, self.weights, masks, attention,
                                  joint=self.mode != "separate", visible=visible)
            pieces.append((start, end, g * self.strength))
            if probe is not None:
                mass = garment_attention_mass(q[start:end], kp, heads, layer.segments, masks)
                probe.record(self, key, mass, layer_grid(extra, q.shape[1]))
        return pieces


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for s, e in ranges:
        if out and out[-1][1] == s:
            out[-1] = (out[-1][0], e)
        else:
            out.append((s, e))
    return out
