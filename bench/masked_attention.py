"""Masked Dressing-Attention: our per-garment log-sum-exp path vs a dense [queries x garment tokens] bias.

Also the visible-only path (each garment attended only from the queries its mask covers).
Prints time per call, peak memory of the call and the ratio to the unmasked path (one attention over all garment
tokens). Runs on the CPU at small sizes by default; on a GPU use real sizes, e.g.
    python bench/masked_attention.py --device cuda --dtype float16 --latent 96x72 --garments 1,2,4 --batch 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from anydressing_core.attention import garment_attention, sdpa_attention, visible_queries  # noqa: E402


def dense_bias_attention(q, keys, values, heads, segments, masks):
    """The alternative: one attention call with an additive [Lq, L] bias (exact for binary masks, weights 1)."""
    lq, total = q.shape[1], keys.shape[1]
    bias = torch.zeros(lq, total, device=q.device, dtype=q.dtype)
    for k, (a, e) in enumerate(segments):
        bias[:, a:e] = torch.where(masks[k].unsqueeze(-1) > 0, 0.0, -10000.0).to(q.dtype)
    b, _, c = q.shape
    d = c // heads
    qh = q.reshape(b, lq, heads, d).transpose(1, 2)
    kh = keys.reshape(1, total, heads, d).transpose(1, 2).expand(b, -1, -1, -1)
    vh = values.reshape(1, total, heads, d).transpose(1, 2).expand(b, -1, -1, -1)
    out = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, attn_mask=bias)
    out = out.transpose(1, 2).reshape(b, lq, c)
    seen = (masks > 0).any(dim=0)  # a query that sees no garment gets exactly 0 (softmax ignores a constant shift)
    return out * seen.view(1, -1, 1).to(out.dtype)


def timed(fn, device, repeats):
    times = []
    peak = 0
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
            peak = max(peak, torch.cuda.max_memory_allocated() - base)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:] if len(times) > 1 else times), peak


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--latent", default="48x36", help="latent HxW of the generated image (first layer's grid)")
    ap.add_argument("--garment-latent", default=None, help="garment latent HxW (default: same as --latent)")
    ap.add_argument("--garments", default="1,2,4")
    ap.add_argument("--batch", type=int, default=1, help="rows that see the garments (e.g. 1 image with cfg: 1)")
    ap.add_argument("--channels", type=int, default=320)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    h, w = (int(v) for v in args.latent.split("x"))
    gh, gw = (int(v) for v in (args.garment_latent or args.latent).split("x"))
    lq, tokens, c, heads = h * w, gh * gw, args.channels, 8
    print(f"device {device}, {dtype}, queries {lq} (latent {h}x{w}), {tokens} tokens per garment, C {c}, "
          f"{heads} heads, batch {args.batch}")
    print(f"{'N':>3} {'unmasked ms':>12} {'per-garment ms':>15} {'visible-only ms':>16} {'dense-bias ms':>14} "
          f"{'per-garment/unmasked':>21} {'visible-only/unmasked':>22} {'dense/per-garment':>18} "
          f"{'dense bias MB':>14} {'max |diff|':>11}")
    g = torch.Generator().manual_seed(0)
    for n in (int(v) for v in args.garments.split(",")):
        q = torch.randn(args.batch, lq, c, generator=g).to(device, dtype)
        keys = torch.randn(1, n * tokens, c, generator=g).to(device, dtype)
        values = torch.randn(1, n * tokens, c, generator=g).to(device, dtype)
        segs = [(i * tokens, (i + 1) * tokens) for i in range(n)]
        masks = torch.zeros(n, lq)
        for i in range(n):  # horizontal bands that overlap a little
            masks[i, max(0, i * lq // n - w): min(lq, (i + 1) * lq // n + w)] = 1.0
        masks = masks.to(device)
        t_plain, _ = timed(lambda: garment_attention(q, keys, values, heads, segs, attention=sdpa_attention),
                           device, args.repeats)
        t_ours, _ = timed(lambda: garment_attention(q, keys, values, heads, segs, masks=masks,
                                                    attention=sdpa_attention), device, args.repeats)
        vis = visible_queries(masks)  # once per grid and sampling run in the pack
        t_vis, _ = timed(lambda: garment_attention(q, keys, values, heads, segs, masks=masks,
                                                   attention=sdpa_attention, visible=vis), device, args.repeats)
        t_dense, _ = timed(lambda: dense_bias_attention(q, keys, values, heads, segs, masks), device, args.repeats)
        ref = dense_bias_attention(q, keys, values, heads, segs, masks).float()
        diff = max((garment_attention(q, keys, values, heads, segs, masks=masks, visible=v).float() - ref)
                   .abs().max().item() for v in (None, vis))
        bias_mb = lq * n * tokens * torch.tensor([], dtype=dtype).element_size() / 2**20
        print(f"{n:>3} {t_plain * 1e3:>12.2f} {t_ours * 1e3:>15.2f} {t_vis * 1e3:>16.2f} {t_dense * 1e3:>14.2f} "
              f"{t_ours / t_plain:>21.2f} {t_vis / t_plain:>22.2f} {t_dense / t_ours:>18.2f} {bias_mb:>14.1f} "
              f"{diff:>11.2e}")


if __name__ == "__main__":
    main()
