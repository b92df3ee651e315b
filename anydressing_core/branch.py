"""Dressing-Attention as a self-attention replacement: O = SelfAttn(Q,K,V) + sum over branches of lambda * G.

A *branch* is one Apply Dressing-Attention node's contribution (its garments, lambda, weights, masks, schedule and
uncond setting). Chained Apply nodes add branches to the same replacement; a replacement another pack installed on
the layer before us is kept and called for the self-attention part.
"""

from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import torch

from .attention import AttentionFn, garment_attention, garment_attention_mass, sdpa_attention, visible_queries
from .layers import LayerKey, format_key
from .masks import resize_to_grid
from .run_state import GARMENT_ROWS_KEY, PROBE_KEY, RUN_CACHE_KEY, WEIGHTS_GENERATION_KEY, RunCache, WeightsGeneration

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
        """Row ranges that see the garments, from cond_or_uncond (0 = cond, 1 = uncond), never batch positions."""
        cou = extra.get("cond_or_uncond")
        if not cou:
            return [(0, batch)]
        garment_rows = extra.get(GARMENT_ROWS_KEY, (0,))
        per = batch // len(cou)
        return [(i * per, (i + 1) * per) for i, c in enumerate(cou) if c in garment_rows or self.include_uncond]

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
                    f"{q.shape[1]} tokens, not {int(act[0])} row(s) of its {w}x{h} grid: a patch before the attention "
                    f"tiles or merges tokens (HyperTile, TomePatchModel), and garment masks cannot follow the tiles. "
                    f"Disconnect garment_masks, or remove HyperTile/TomePatchModel from the MODEL")
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

    def extra_tokens(self, key: LayerKey, q: torch.Tensor, extra: dict) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """Concat mode (MagicClothing): K/V tokens to join to the layer's own, [B, L, C] each; None when inactive.

        Rows that see the garments get F W_k / F W_v (values scaled by strength); the other rows get zero tokens,
        as MagicClothing gives its unconditional rows.
        """
        layer = self.layers.get(key)
        if self.mode != "concat" or layer is None or not self.active_at(extra):
            return None
        ranges = self.rows(extra, q.shape[0])
        if not ranges:
            return None
        kp, vp = self.projected(key, layer, q.device, q.dtype, extra.get(RUN_CACHE_KEY), extra.get(WEIGHTS_GENERATION_KEY))
        k_add = q.new_zeros((q.shape[0], kp.shape[1], kp.shape[2]))
        v_add = q.new_zeros((q.shape[0], vp.shape[1], vp.shape[2]))
        for start, end in _merge(ranges):
            k_add[start:end] = kp
            v_add[start:end] = vp * self.strength
        return k_add, v_add

    @staticmethod
    def any_visible(masks: torch.Tensor) -> bool:
        """Whether any query of this grid sees a garment (a host sync: only used without a run cache)."""
        return bool((masks > 0).any())

    def visible(self, masks: torch.Tensor, cache: Optional[RunCache]) -> Optional[list[torch.Tensor]]:
        """Per garment, the queries of this grid that see it, once per grid and run (its one host sync).

        Lets each garment be attended only where its mask is, so disjoint masks cost about one garment's attention.
        Without a run cache (no sampling wrapper) it would sync at every call, so the dense masked path is used.
        """
        if cache is None:
            return None
        ck = ("visible", id(self), tuple(masks.shape), str(masks.device))
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
        visible = None if masks is None else self.visible(masks, cache)
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


class DressingAttentionReplace:
    """An attn1 replacement for one layer: self-attention (or the replacement it wraps) plus each branch's output."""

    def __init__(self, key: LayerKey, self_attention: SelfAttentionFn, previous: Any = None,
                 branches: Optional[list[DressingBranch]] = None):
        self.key = key
        self.self_attention = self_attention
        self.previous = previous
        self.branches: list[DressingBranch] = list(branches or [])

    def with_branch(self, branch: DressingBranch) -> "DressingAttentionReplace":
        """A new replacement with one more branch (copy-on-write: the upstream MODEL's object is untouched)."""
        return DressingAttentionReplace(self.key, self.self_attention, self.previous, self.branches + [branch])

    def __deepcopy__(self, memo):
        return DressingAttentionReplace(self.key, self.self_attention, copy.deepcopy(self.previous, memo),
                                        list(self.branches))

    def to(self, *args, **kwargs):
        """ComfyUI moves patches between devices; garment tensors move lazily, per run, to where q is."""
        if self.previous is not None and hasattr(self.previous, "to"):
            moved = self.previous.to(*args, **kwargs)
            if moved is not None:
                self.previous = moved
        return self

    def models(self) -> list:
        """Models the wrapped replacement needs loaded (ComfyUI's model management asks every patch for them)."""
        if self.previous is not None and hasattr(self.previous, "models"):
            return list(self.previous.models())
        return []

    def cleanup(self, *args, **kwargs):
        """ComfyUI asks patches to clean up after a run: the wrapped replacement gets the call (ours keeps no state)."""
        if self.previous is not None and hasattr(self.previous, "cleanup"):
            return self.previous.cleanup(*args, **kwargs)
        return None

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra: dict) -> torch.Tensor:
        joined = [b.extra_tokens(self.key, q, extra) for b in self.branches if b.mode == "concat"]
        joined = [j for j in joined if j is not None]
        if joined:  # concat mode: one softmax over the latent tokens and the garment tokens
            k = torch.cat([k] + [j[0].to(k.dtype) for j in joined], dim=1)
            v = torch.cat([v] + [j[1].to(v.dtype) for j in joined], dim=1)
        if self.previous is not None:
            out = self.previous(q, k, v, extra)
        else:
            out = self.self_attention(q, k, v, extra)
        pieces = []
        for branch in self.branches:
            p = branch.output(self.key, q, extra)
            if p:
                pieces.extend(p)
        if not pieces:
            return out
        out = out.clone()
        for start, end, g in pieces:
            out[start:end] += g.to(out.dtype)
        return out


class DressedLayers:
    """layer key -> the DressingAttentionReplace this MODEL's Apply nodes installed there (copy-on-write).

    Kept in transformer_options so that, at every model call, an attn1 replacement that a later node put over ours
    (Self-Attention Guidance on the MODEL, Perturbed-Attention Guidance inside its extra pass) can be wrapped:
    it computes the self-attention part and the garment branches are added to its output, exactly as when it
    was installed before Apply Dressing-Attention. Not a dict, so ComfyUI's option copies keep it.
    """

    def __init__(self, layers: Optional[dict] = None):
        self.layers: dict[LayerKey, DressingAttentionReplace] = dict(layers or {})

    def with_layers(self, layers: dict) -> "DressedLayers":
        return DressedLayers({**self.layers, **layers})

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self


def restore_dressing(replaces: dict, dressed: DressedLayers) -> dict:
    """The attn1 entries to put over `replaces` so every dressed layer still adds its garment branches.

    A layer whose current replacement is not (a descendant of) ours gets a DressingAttentionReplace wrapping it.
    """
    fix = {}
    for key, ours in dressed.layers.items():
        current = replaces.get(key, replaces.get((key[0], key[1])))
        if current is ours:
            continue
        if isinstance(current, DressingAttentionReplace) and all(b in current.branches for b in ours.branches):
            continue
        fix[key] = DressingAttentionReplace(key, ours.self_attention, previous=current, branches=ours.branches)
    return fix
