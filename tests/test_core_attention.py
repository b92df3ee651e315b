"""Host-free: the garment branch of Dressing-Attention against an explicit per-query softmax reference."""

from __future__ import annotations

import math

import pytest
import torch

import anydressing_core.attention as attention_mod
from anydressing_core.attention import attention_with_lse, garment_attention, sdpa_attention, visible_queries
from anydressing_core import hooks
from anydressing_core.branch import DressingBranch, DressingLayer
from anydressing_core.run_state import GARMENT_UUIDS_KEY, RunCache
from block_sim import Block, run_block

HEADS = 2


def reference(q, keys, values, heads, segments, weights=None, masks=None):
    """decisions.md, literally: per query and head, softmax over the visible garments' tokens only (float64)."""
    b, lq, c = q.shape
    d = c // heads
    n = len(segments)
    w = [1.0] * n if weights is None else list(weights)
    out = torch.zeros(b, lq, c, dtype=torch.float64)
    q64, k64, v64 = q.double(), keys.double().expand(b, -1, -1), values.double().expand(b, -1, -1)
    for bi in range(b):
        for qi in range(lq):
            mv = [1.0] * n if masks is None else [float(masks[k, qi]) for k in range(n)]
            visible = [k for k in range(n) if mv[k] > 0]
            if not visible:
                continue
            for h in range(heads):
                sl = slice(h * d, (h + 1) * d)
                toks = [j for k in visible for j in range(*segments[k])]
                s = torch.stack([q64[bi, qi, sl] @ k64[bi, j, sl] / math.sqrt(d) for j in toks])
                p = torch.softmax(s, dim=0)
                acc = torch.zeros(d, dtype=torch.float64)
                pos = 0
                for k in visible:
                    for j in range(*segments[k]):
                        acc += w[k] * mv[k] * p[pos] * v64[bi, j, sl]
                        pos += 1
                out[bi, qi, sl] = acc
    return out


def make(seed=0, b=2, lq=6, c=8, lens=(3, 4, 2)):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, lq, c, generator=g)
    total = sum(lens)
    keys = torch.randn(1, total, c, generator=g)
    values = torch.randn(1, total, c, generator=g)
    segs, start = [], 0
    for length in lens:
        segs.append((start, start + length))
        start += length
    return q, keys, values, segs


def test_unmasked_is_one_softmax_over_all_garments():
    q, k, v, segs = make()
    got = garment_attention(q, k, v, HEADS, segs)
    ref = reference(q, k, v, HEADS, segs)
    assert got.shape == q.shape
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)


def test_weights_scale_each_garments_share():
    q, k, v, segs = make(1)
    w = [1.0, 0.25, 2.0]
    got = garment_attention(q, k, v, HEADS, segs, weights=w)
    torch.testing.assert_close(got.double(), reference(q, k, v, HEADS, segs, weights=w), atol=1e-5, rtol=1e-5)


def test_binary_and_soft_masks_match_reference():
    q, k, v, segs = make(2, lq=6)
    masks = torch.tensor([[1, 1, 0, 0, 0, 1], [0, 1, 1, 0, 0, 1], [0, 0, 0, 0, 1, 1]], dtype=torch.float32)
    got = garment_attention(q, k, v, HEADS, segs, masks=masks)
    ref = reference(q, k, v, HEADS, segs, masks=masks)
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)
    # query 3 sees no garment: exactly zero
    assert torch.equal(got[:, 3], torch.zeros_like(got[:, 3]))
    soft = masks * torch.tensor([[0.3], [0.9], [0.5]])
    got = garment_attention(q, k, v, HEADS, segs, weights=[1.0, 0.5, 1.5], masks=soft)
    ref = reference(q, k, v, HEADS, segs, weights=[1.0, 0.5, 1.5], masks=soft)
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)


def test_all_zero_masks_give_exact_zero():
    q, k, v, segs = make(3)
    got = garment_attention(q, k, v, HEADS, segs, masks=torch.zeros(3, q.shape[1]))
    assert torch.equal(got, torch.zeros_like(q))


def test_garment_with_empty_mask_is_as_if_absent():
    q, k, v, segs = make(4)
    masks = torch.ones(3, q.shape[1])
    masks[1] = 0
    got = garment_attention(q, k, v, HEADS, segs, masks=masks)
    keep = torch.cat([k[:, 0:3], k[:, 7:9]], dim=1), torch.cat([v[:, 0:3], v[:, 7:9]], dim=1)
    without = garment_attention(q, keep[0], keep[1], HEADS, [(0, 3), (3, 5)], masks=torch.ones(2, q.shape[1]))
    torch.testing.assert_close(got, without, atol=1e-5, rtol=1e-5)


def test_permuting_garments_changes_nothing_and_duplicates_with_their_mask():
    q, k, v, segs = make(5)
    masks = torch.rand(3, q.shape[1])
    got = garment_attention(q, k, v, HEADS, segs, weights=[1.0, 0.5, 2.0], masks=masks)
    order = [2, 0, 1]
    kk = torch.cat([k[:, slice(*segs[i])] for i in order], dim=1)
    vv = torch.cat([v[:, slice(*segs[i])] for i in order], dim=1)
    lens = [segs[i][1] - segs[i][0] for i in order]
    psegs = [(sum(lens[:i]), sum(lens[:i + 1])) for i in range(3)]
    perm = garment_attention(q, kk, vv, HEADS, psegs, weights=[2.0, 1.0, 0.5], masks=masks[order])
    scale = got.abs().max()
    assert (perm - got).abs().max() <= 1e-5 * scale
    # a single garment duplicated (same tokens, same mask) changes nothing
    one = garment_attention(q, k[:, 0:3], v[:, 0:3], HEADS, [(0, 3)])
    dup = garment_attention(q, k[:, [0, 1, 2, 0, 1, 2]], v[:, [0, 1, 2, 0, 1, 2]], HEADS, [(0, 3), (3, 6)])
    assert (dup - one).abs().max() <= 1e-5 * one.abs().max()


def test_one_garment_with_mask_and_weight_is_one_attention_call_and_matches_reference():
    q, k, v, segs = make(7, lens=(5,))
    mask = torch.tensor([[0.0, 0.4, 1.0, 0.0, 0.7, 1.0]])
    calls = []

    def counting(*args):
        calls.append(1)
        return sdpa_attention(*args)

    got = garment_attention(q, k, v, HEADS, segs, weights=[1.5], masks=mask, attention=counting)
    torch.testing.assert_close(got.double(), reference(q, k, v, HEADS, segs, weights=[1.5], masks=mask),
                               atol=1e-5, rtol=1e-5)
    assert len(calls) == 1  # no per-garment log-sum-exp merge for a single garment
    assert torch.equal(got[:, 0], torch.zeros_like(got[:, 0])) and torch.equal(got[:, 3], torch.zeros_like(got[:, 3]))


def test_per_row_masks_with_per_row_garment_tokens():
    """Masks [B, N, Lq] with keys that differ per row: each row uses its own masks (the separate/one-garment path)."""
    q, k, v, segs = make(8, lens=(4,))
    k2 = torch.cat([k, torch.randn_like(k)]), torch.cat([v, torch.randn_like(v)])
    masks = torch.tensor([[[1.0, 0.0, 1.0, 0.0, 1.0, 0.5]], [[0.0, 1.0, 1.0, 1.0, 0.0, 0.2]]])
    got = garment_attention(q, k2[0], k2[1], HEADS, segs, masks=masks)
    for row in range(2):
        ref = reference(q[row:row + 1], k2[0][row:row + 1], k2[1][row:row + 1], HEADS, segs, masks=masks[row])
        torch.testing.assert_close(got[row:row + 1].double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("joint", [True, False])
@pytest.mark.parametrize("lens", [(3,), (3, 4), (3, 4, 2)])
def test_visible_query_indices_give_the_same_result_and_attend_only_visible_queries(monkeypatch, joint, lens):
    q, k, v, segs = make(9, b=3, lq=8, lens=lens)
    n = len(lens)
    g = torch.Generator().manual_seed(10)
    masks = (torch.rand(n, 8, generator=g) > 0.5).float() * torch.rand(n, 8, generator=g).clamp_min(0.1)
    masks[0, :] = 0  # a garment nobody sees
    if n > 1:
        masks[1, :3] = 1
    weights = [1.0, 0.5, 2.0][:n]
    attended = []
    original = attention_mod.attention_with_lse
    monkeypatch.setattr(attention_mod, "attention_with_lse",
                        lambda qh, kh, vh, scale=None: (attended.append(qh.shape[2]), original(qh, kh, vh, scale))[1])

    def counting(qq, kk, vv, heads):
        attended.append(qq.shape[1])
        return sdpa_attention(qq, kk, vv, heads)

    dense = garment_attention(q, k, v, HEADS, segs, weights, masks, counting, joint)
    dense_count = sum(attended)
    attended.clear()
    sparse = garment_attention(q, k, v, HEADS, segs, weights, masks, counting, joint, visible_queries(masks))
    torch.testing.assert_close(sparse, dense, atol=1e-5, rtol=1e-5)
    if joint:
        torch.testing.assert_close(sparse.double(), reference(q, k, v, HEADS, segs, weights, masks), atol=1e-5,
                                   rtol=1e-5)
    # every row's visible queries, and only those: the rows are folded into one query sequence
    assert sum(attended) == 3 * int((masks > 0).sum()) < dense_count


def test_visible_indices_need_two_dimensional_masks():
    q, k, v, segs = make(11, lens=(3, 4))
    with pytest.raises(ValueError, match=r"visible query indices need 2-D garment masks \[N, Lq\]"):
        garment_attention(q, k, v, HEADS, segs, visible=[torch.arange(3), torch.arange(2)])


def test_uniform_path_equals_general_path():
    q, k, v, segs = make(6)
    fast = garment_attention(q, k, v, HEADS, segs)
    general = garment_attention(q, k, v, HEADS, segs, masks=torch.ones(3, q.shape[1]))
    torch.testing.assert_close(fast, general, atol=1e-5, rtol=1e-5)


def test_attention_with_lse_matches_math():
    g = torch.Generator().manual_seed(7)
    qh, kh, vh = (torch.randn(2, 3, n, 8, generator=g) for n in (20, 33, 33))
    out, lse = attention_with_lse(qh, kh, vh)
    s = qh @ kh.transpose(-1, -2) / math.sqrt(8)
    torch.testing.assert_close(lse, s.logsumexp(-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, s.softmax(-1) @ vh, atol=1e-5, rtol=1e-5)


def _branch(layers, **kw):
    return DressingBranch(layers, attention=sdpa_attention, **kw)


def _setup(seed=8, b_per=2, lq=6, c=8):
    """A block, its input x [2*b_per, lq, c] and garment tokens whose K'/V' are F and 0.5 F."""
    x, k, v, segs = make(seed, b=2 * b_per, lq=lq, c=c)
    layer = DressingLayer(features=k, segments=segs, key_proj=torch.eye(c), value_proj=torch.eye(c) * 0.5)
    return Block(c, seed), x, layer


def _term_of(block, x, layer, strength, rows, **kw):
    """The garment term computed another way: W_out (lambda G(to_q(norm1(x)))) on the given rows, 0 elsewhere."""
    q = block.attn1.to_q(block.norm1(x))
    g = garment_attention(q, layer.features, layer.features * 0.5, HEADS, layer.segments, **kw)
    term = torch.zeros_like(x)
    term[rows] = torch.nn.functional.linear(strength * g[rows], block.attn1.to_out[0].weight)
    return term


def _dressed(block, x, key, branches, extra, replace=None):
    to = dict(extra)
    for b in branches:
        hooks.install(to, b, {key: block})
    return run_block(block, x, key, to, HEADS, replace)


@torch.no_grad()
def test_the_garment_term_adds_lambda_times_garments_on_cond_rows_only():
    block, x, layer = _setup()
    key = ("input", 1, 0)
    extra = {"cond_or_uncond": [1, 0], "activations_shape": [4, 8, 2, 3]}
    base = run_block(block, x, key, extra, HEADS)
    out = _dressed(block, x, key, [_branch({key: layer}, strength=0.7)], extra)
    # rows 0-1 are uncond (cond_or_uncond[0] == 1): untouched; rows 2-3 are cond
    assert torch.equal(out[:2], base[:2])
    torch.testing.assert_close(out, base + _term_of(block, x, layer, 0.7, slice(2, 4)), atol=1e-6, rtol=1e-6)
    both = _dressed(block, x, key, [_branch({key: layer}, strength=0.7, include_uncond=True)], extra)
    torch.testing.assert_close(both, base + _term_of(block, x, layer, 0.7, slice(0, 4)), atol=1e-6, rtol=1e-6)


@torch.no_grad()
def test_rows_are_chosen_by_their_conditioning_identity_not_their_place():
    """Another node's extra pass sends the negative alone (cond_or_uncond [0]): its identity says it is not the
    positive, so it is not dressed; a positive chunk is dressed wherever it sits."""
    block, x, layer = _setup(15)
    key = ("input", 1, 0)
    pos, neg = "uuid-positive", "uuid-negative"
    ids = {GARMENT_UUIDS_KEY: frozenset({pos})}
    branch = [_branch({key: layer}, strength=0.7)]
    extra_pass = {"cond_or_uncond": [0], "uuids": [neg], **ids}
    assert torch.equal(_dressed(block, x, key, branch, extra_pass), run_block(block, x, key, extra_pass, HEADS))
    swapped = {"cond_or_uncond": [1, 0], "uuids": [pos, neg], **ids}  # the positive first, whatever its index
    base = run_block(block, x, key, swapped, HEADS)
    out = _dressed(block, x, key, branch, swapped)
    torch.testing.assert_close(out, base + _term_of(block, x, layer, 0.7, slice(0, 2)), atol=1e-6, rtol=1e-6)


@torch.no_grad()
def test_strength_zero_and_zero_masks_are_exactly_unpatched():
    block, x, layer = _setup(9)
    key = ("output", 9, 0)
    extra = {"cond_or_uncond": [0, 1], "activations_shape": [4, 8, 2, 3]}
    base = run_block(block, x, key, extra, HEADS)
    for branch in (_branch({key: layer}, strength=0.0),
                   _branch({key: layer}, strength=1.0, masks=torch.zeros(3, 16, 24))):
        assert torch.equal(_dressed(block, x, key, [branch], extra), base)


@torch.no_grad()
def test_branches_stack_copy_on_write_and_a_replacement_keeps_the_self_attention():
    """Two Apply nodes: two branches in one term (the first MODEL's options untouched); an attn1 replacement
    (another pack's) computes the self-attention, and the garments are added to its output exactly once."""
    block, x, layer = _setup(10)
    key = ("middle", 0, 0)
    extra = {"cond_or_uncond": [0, 1]}
    b1, b2 = _branch({key: layer}, strength=0.5), _branch({key: layer}, strength=0.25)
    first = dict(extra)
    hooks.install(first, b1, {key: block})
    second = dict(first)
    term = hooks.install(second, b2, {key: block})
    assert hooks.find_term(first).branches == [b1] and term.branches == [b1, b2]
    assert first["patches"]["middle_patch"] == [hooks.find_term(first).middle_patch]  # untouched by the second
    calls = []

    def replacement(q, k, v, extra_):
        calls.append(1)
        return torch.full_like(q, 2.0)

    base = run_block(block, x, key, extra, HEADS, replacement)
    out = run_block(block, x, key, second, HEADS, replacement)
    torch.testing.assert_close(out, base + _term_of(block, x, layer, 0.75, slice(0, 2)), atol=1e-6, rtol=1e-6)
    assert len(calls) == 2  # one per block call: the garment term calls nothing of the replacement's


def test_sigma_window_gates_the_branch():
    _, q, layer = _setup(11)
    key = ("input", 4, 0)
    br = _branch({key: layer}, strength=1.0, sigma_start=5.0, sigma_end=1.0)
    assert br.active_at({"sigmas": torch.tensor([3.0])})
    assert not br.active_at({"sigmas": torch.tensor([7.0])})
    assert not br.active_at({"sigmas": torch.tensor([0.5])})


def test_run_cache_projects_once_per_run():
    _, q, layer = _setup(12)
    key = ("input", 1, 0)
    calls = []

    def proj(f):
        calls.append(1)
        return f

    layer = DressingLayer(features=layer.features, segments=layer.segments, key_proj=proj, value_proj=proj)
    br = _branch({key: layer})
    cache = RunCache()
    extra = {"n_heads": HEADS, "cond_or_uncond": [0, 1], "anydressing_run_cache": cache}
    for _ in range(3):
        br.output(key, q, extra)
    assert len(calls) == 2  # K' and V' once each for three steps
    br.output(key, q, {"n_heads": HEADS})
    assert len(calls) == 4  # without a run cache: computed for the call


def test_mask_shape_error_is_clear():
    q, k, v, segs = make(13)
    with pytest.raises(ValueError, match=r"garment masks have shape \(2, 6\); expected \[3, 6\]"):
        garment_attention(q, k, v, HEADS, segs, masks=torch.ones(2, 6))


def test_masked_branch_finds_visible_queries_once_per_run_and_matches_the_dense_path(monkeypatch):
    _, q, layer = _setup(14)
    key = ("input", 1, 0)
    masks = torch.zeros(3, 4, 6)  # a 2x3 token grid, masks at 2x the resolution
    masks[0, :2] = 1
    masks[1, 2:] = 1
    masks[2, :, :2] = 0.5
    br = _branch({key: layer}, masks=masks, weights=[1.0, 0.5, 2.0])
    import anydressing_core.branch as branch_mod

    found = []
    monkeypatch.setattr(branch_mod, "visible_queries", lambda m: (found.append(1), visible_queries(m))[1])
    cache = RunCache()
    extra = {"n_heads": HEADS, "cond_or_uncond": [0, 1], "activations_shape": [4, 8, 2, 3],
             "anydressing_run_cache": cache}
    outs = [br.output(key, q, extra) for _ in range(3)]
    assert len(found) == 1  # one host sync for the grid, not one per step
    dense = br.output(key, q, {"n_heads": HEADS, "cond_or_uncond": [0, 1], "activations_shape": [4, 8, 2, 3]})
    assert len(found) == 1  # without a run cache: the dense masked path
    for pieces in outs:
        (s0, e0, g0), = pieces
        (s1, e1, g1), = dense
        assert (s0, e0) == (s1, e1) == (0, 2)
        torch.testing.assert_close(g0, g1, atol=1e-5, rtol=1e-5)


def test_visible_queries_are_cached_per_grid_not_per_token_count(monkeypatch):
    """Two layers whose grids have the same token count (4x4 and 8x2) see different queries of the same masks."""
    _, q16, layer = _setup(16, lq=16)
    key = ("input", 1, 0)
    masks = torch.zeros(3, 8, 8)
    masks[0, :4] = 1  # the top half
    masks[1, 4:] = 1
    masks[2, :, :4] = 1  # the left half
    br = _branch({key: layer}, masks=masks)
    cache = RunCache()
    for grid in ((4, 4), (8, 2)):
        extra = {"n_heads": HEADS, "cond_or_uncond": [0, 1], "activations_shape": [4, 8, *grid],
                 "anydressing_run_cache": cache}
        dense = {k: v for k, v in extra.items() if k != "anydressing_run_cache"}
        (_, _, cached), = br.output(key, q16, extra)
        (_, _, reference), = br.output(key, q16, dense)
        torch.testing.assert_close(cached, reference, atol=1e-5, rtol=1e-5)
