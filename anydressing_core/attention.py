"""The garment branch of Dressing-Attention (paper eq. 6) with the masked semantics of decisions.md.

For queries q (one row per latent token), garments k = 1..N with projected tokens K'_k, V'_k, weights w_k and optional
per-query mask values m_k(q):

    V(q)   = {k : m_k(q) > 0}
    p(q,j) = softmax over the tokens of the visible garments only of q.K'_j / sqrt(d), per head
    G(q)   = sum_{k in V(q)} w_k m_k(q) sum_{j in T_k} p(q,j) V'_j         (0 when V(q) is empty)

Without masks and with all w_k = 1 this is one softmax over all garment tokens: a single attention call.
Otherwise each garment is attended separately and the per-garment results are merged with log-sum-exp
weights, which is exact and never builds a [queries x all garment tokens] bias.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
from einops import rearrange

# attention(q, k, v, heads, transformer_options=...) -> [B, Lq, heads*d]; q/k/v are [B, L, heads*d]. The node layer
# passes ComfyUI's optimized attention here, and the layer's transformer_options with it, so every backend (and the
# attention overrides of the core and other packs) applies to the garment branch too.
AttentionFn = Callable[..., torch.Tensor]


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, **options) -> torch.Tensor:
    """Plain multi-head attention with torch's SDPA; used when no host attention function is given (options, such
    as transformer_options, are for host attention functions and are not needed here)."""
    out = torch.nn.functional.scaled_dot_product_attention(_split_heads(q, heads), _split_heads(k, heads),
                                                           _split_heads(v, heads))
    return _merge_heads(out)


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, L, heads*d] -> [B, heads, L, d]."""
    return rearrange(x, "b l (h d) -> b h l d", h=heads)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, heads, L, d] -> [B, L, heads*d]."""
    return rearrange(x, "b h l d -> b l (h d)")


def _attention_lse_math(qh: torch.Tensor, kh: torch.Tensor, vh: torch.Tensor, scale: float,
                        chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention and log-sum-exp in float32, in query chunks so memory stays bounded."""
    outs, lses = [], []
    kt = kh.float().transpose(-1, -2)
    vf = vh.float()
    for start in range(0, qh.shape[-2], chunk):
        s = torch.matmul(qh[..., start:start + chunk, :].float(), kt) * scale
        lse = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - lse.unsqueeze(-1))
        outs.append(torch.matmul(p, vf))
        lses.append(lse)
    return torch.cat(outs, dim=-2).to(qh.dtype), torch.cat(lses, dim=-1)


_FUSED_OK: dict[tuple[str, torch.dtype], bool] = {}


def _attention_lse_fused(qh, kh, vh, scale):
    if qh.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qh, kh, vh, 0.0, False, scale=scale)[:2]
        return out, lse.float()
    if qh.device.type == "cuda":
        res = torch.ops.aten._scaled_dot_product_efficient_attention(qh, kh, vh, None, True, scale=scale)
        out, lse = res[0], res[1]
        return out, lse[..., : qh.shape[-2]].float()
    raise NotImplementedError


def attention_with_lse(qh: torch.Tensor, kh: torch.Tensor, vh: torch.Tensor,
                       scale: Optional[float] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output [B,h,Lq,d] and its log-sum-exp [B,h,Lq] (float32).

    Uses torch's fused kernels, which return the log-sum-exp, where they exist; each (device, dtype) is checked once
    against the exact math on a small slice and the math path is used if the fused kernel is missing or disagrees.
    """
    if scale is None:
        scale = 1.0 / math.sqrt(qh.shape[-1])
    tag = (qh.device.type, qh.dtype)
    ok = _FUSED_OK.get(tag)
    if ok is None:
        try:
            qs, ks, vs = qh[:1, :, :8].contiguous(), kh[:1, :, :16].contiguous(), vh[:1, :, :16].contiguous()
            o1, l1 = _attention_lse_fused(qs, ks, vs, scale)
            o2, l2 = _attention_lse_math(qs, ks, vs, scale)
            tol = 1e-3 if qh.dtype == torch.float32 else 2e-2
            ok = bool(torch.allclose(l1, l2, atol=tol, rtol=tol) and
                      torch.allclose(o1.float(), o2.float(), atol=tol * 4, rtol=tol * 4))
        except Exception:
            ok = False
        _FUSED_OK[tag] = ok
    if ok:
        try:
            return _attention_lse_fused(qh.contiguous(), kh.contiguous(), vh.contiguous(), scale)
        except Exception:
            _FUSED_OK[tag] = False
    return _attention_lse_math(qh, kh, vh, scale)


def visible_queries(masks: torch.Tensor) -> list[torch.Tensor]:
    """Per garment, the indices of the queries that see it (m_k(q) > 0), from masks [N, Lq].

    One host sync (the counts decide the shapes): callers compute this once per mask grid and sampling run and pass
    it to garment_attention, never per step.
    """
    return [torch.nonzero(masks[k] > 0, as_tuple=False).reshape(-1) for k in range(masks.shape[0])]


def garment_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, heads: int,
                      segments: Sequence[tuple[int, int]], weights: Optional[Sequence[float]] = None,
                      masks: Optional[torch.Tensor] = None,
                      attention: AttentionFn = sdpa_attention, joint: bool = True,
                      visible: Optional[Sequence[torch.Tensor]] = None) -> torch.Tensor:
    """The garment branch G for queries q [B, Lq, C] over garment tokens keys/values [1 or B, L, C].

    joint=False attends each garment on its own and sums the results (DreamFit): G = sum_k w_k m_k(q) Attn_k(q).

    segments: token range (start, end) of each garment in keys/values. weights: w_k (default 1).
    masks: [N, Lq] or [B, N, Lq] values in [0, 1] (None means 1 everywhere). Returns [B, Lq, C].
    visible: optional visible_queries(masks) for 2-D masks. Each garment is then attended only from the queries that
    see it (the others get exactly nothing from it anyway), so disjoint masks cost about one garment's attention
    instead of N. Same result either way.
    """
    n = len(segments)
    b, lq, c = q.shape
    if masks is not None and (masks.shape[-2] != n or masks.shape[-1] != lq or masks.dim() not in (2, 3)):
        raise ValueError(f"garment masks have shape {tuple(masks.shape)}; expected [{n}, {lq}]")
    if visible is not None and (masks is None or masks.dim() != 2 or len(visible) != n):
        raise ValueError("visible query indices need 2-D garment masks [N, Lq], one index tensor per garment")
    if keys.shape[0] == 1 and b > 1:
        # Garment tokens are shared by every row: fold the rows into one long query sequence instead of expanding
        # K'/V' per row (no copies, one larger attention call; each query is independent, so results are equal).
        folded_masks = folded_visible = None
        if masks is not None:
            m = masks if masks.dim() == 3 else masks.unsqueeze(0).expand(b, -1, -1)
            folded_masks = rearrange(m, "b n l -> n (b l)")
        if visible is not None:  # the same queries in every row, offset by the row (device arithmetic, no sync)
            offsets = torch.arange(b, device=q.device).unsqueeze(1) * lq
            folded_visible = [(idx.to(q.device).unsqueeze(0) + offsets).reshape(-1) for idx in visible]
        folded = rearrange(q, "b l c -> 1 (b l) c")
        out = garment_attention(folded, keys, values, heads, segments, weights, folded_masks, attention, joint,
                                folded_visible)
        return rearrange(out, "1 (b l) c -> b l c", b=b)
    coef = [1.0] * n if weights is None else [float(w) for w in weights]  # Python floats: no host-to-device copy
    if len(coef) != n:
        raise ValueError(f"{len(coef)} garment weights given for {n} garments")
    idx = None if visible is None else [v.to(q.device) for v in visible]
    if not joint or n == 1:
        # (one garment: its share of the visible garments' softmax mass is 1 wherever it is visible, so the joint
        # form is exactly w m(q) Attn(q): one attention call, no log-sum-exp merge)
        total = torch.zeros_like(q)
        for k, (start, end) in enumerate(segments):
            qk = q if idx is None else q.index_select(1, idx[k])
            if qk.shape[1] == 0:
                continue
            o = attention(qk, keys[:, start:end].expand(b, -1, -1), values[:, start:end].expand(b, -1, -1), heads)
            if masks is not None:
                mk = masks[k] if masks.dim() == 2 else masks[:, k]  # [Lq] or [B, Lq]
                if idx is not None:
                    mk = mk.to(q.device).index_select(-1, idx[k])
                o = o * mk.to(device=q.device, dtype=q.dtype).reshape(-1, qk.shape[1], 1)
            if coef[k] != 1.0:
                o = o * coef[k]
            if idx is None:
                total = total + o
            else:
                total.index_add_(1, idx[k], o)
        return total
    if masks is None and all(w == 1.0 for w in coef):
        # Exactly eq. 6: one softmax over all garment tokens.
        return attention(q, keys.expand(b, -1, -1), values.expand(b, -1, -1), heads)

    m = None
    if masks is not None:  # (no host sync here: queries that see no garment come out as exact zeros below)
        m = masks.to(device=q.device, dtype=torch.float32)
        if m.dim() == 2:
            m = m.unsqueeze(0)

    qh = _split_heads(q, heads)
    h = qh.shape[1]
    outs: list[Optional[torch.Tensor]] = []
    lse_all = torch.full((n, b, h, lq), float("-inf"), device=q.device, dtype=torch.float32)
    for k, (start, end) in enumerate(segments):
        qk = qh if idx is None else qh.index_select(2, idx[k])
        if qk.shape[2] == 0:
            outs.append(None)
            continue
        kh = _split_heads(keys[:, start:end], heads).expand(b, -1, -1, -1)
        vh = _split_heads(values[:, start:end], heads).expand(b, -1, -1, -1)
        o, lse = attention_with_lse(qk, kh, vh)
        outs.append(o)
        if idx is None:
            lse_all[k] = lse
        else:
            lse_all[k].index_copy_(-1, idx[k], lse)
    if m is not None and idx is None:
        visible_mask = (m > 0).permute(1, 0, 2).unsqueeze(2)  # [N, B|1, 1, Lq]
        lse_all = lse_all.masked_fill(~visible_mask, float("-inf"))
    total = torch.logsumexp(lse_all, dim=0, keepdim=True)
    share = torch.nan_to_num(torch.exp(lse_all - total), nan=0.0)  # no visible garment: -inf - -inf -> 0
    out = torch.zeros_like(qh, dtype=torch.float32)
    for k in range(n):
        if outs[k] is None:
            continue
        mix = share[k] * coef[k]
        if m is not None:
            mix = mix * m[:, k].unsqueeze(1)
        if idx is None:
            out = out + mix.unsqueeze(-1) * outs[k].float()
        else:
            out.index_add_(2, idx[k], mix.index_select(-1, idx[k]).unsqueeze(-1) * outs[k].float())
    return _merge_heads(out.to(q.dtype))


def garment_attention_mass(q: torch.Tensor, keys: torch.Tensor, heads: int, segments: Sequence[tuple[int, int]],
                           masks: Optional[torch.Tensor] = None, chunk: int = 1024) -> torch.Tensor:
    """The paper's A_k (eq. 8): each query's softmax mass on garment k's tokens, averaged over heads -> [N, B, Lq].

    Exact and never materialised as [queries x all tokens]: per garment log-sum-exp, merged like the attention
    itself. Where masks hide every garment from a query, all A_k are 0 there.
    """
    lq = q.shape[1]
    qh = _split_heads(q, heads).float()
    d = qh.shape[-1]
    scale = 1.0 / math.sqrt(d)
    lses = []
    for start, end in segments:
        kt = _split_heads(keys[:, start:end], heads).float().transpose(-1, -2)
        parts = [torch.logsumexp(torch.matmul(qh[..., s:s + chunk, :], kt) * scale, dim=-1)
                 for s in range(0, lq, chunk)]
        lses.append(torch.cat(parts, dim=-1))
    lse_all = torch.stack(lses, dim=0)  # [N, B, h, Lq]
    if masks is not None:
        m = masks.to(device=q.device, dtype=torch.float32)
        m = m.unsqueeze(0) if m.dim() == 2 else m
        visible = (m > 0).permute(1, 0, 2).unsqueeze(2)
        lse_all = lse_all.masked_fill(~visible, float("-inf"))
    total = torch.logsumexp(lse_all, dim=0, keepdim=True)
    share = torch.nan_to_num(torch.exp(lse_all - total), nan=0.0)
    return share.mean(dim=2)
