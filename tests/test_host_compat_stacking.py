"""Host: dressing composes with any other attention patch by construction (issue 21).

The garment term is added through an attn1_patch and a middle_patch (lists every pack appends to), never through
the attn1 replace slot. Each cell is checked against a second computation: an independent reference garment term
(module hooks, tests/reference_dressing.py), the other order of the same nodes, or the rows ComfyUI says belong to
the positive conditioning.
"""

from __future__ import annotations

import random

import pytest
import torch

import graphs
from compare import rel
from reference_dressing import reference_dressing

pytestmark = pytest.mark.host

_RUNS = [0]
BOXES = [(0, 0, 1, 0.5, 1.0), (0, 0.5, 1, 1, 1.0)]


def node(class_type: str, model_ref, **inputs) -> dict:
    return {"class_type": class_type, "inputs": {"model": model_ref, **inputs}}


def sample(host, store, *, before=(), after=(), dressed=True, capture_model=False, seed_rng=True, **kw):
    """One graph: model patches `before` Apply Dressing-Attention (on the MODEL it takes) and `after` it; returns the
    latent (and the dressed MODEL). Each patch is (class_type, inputs)."""
    _RUNS[0] += 1
    key = f"stack{_RUNS[0]}"
    pre = {}
    ref = ["model", 0]
    for i, (ct, inputs) in enumerate(before):
        pre[f"pre{i}"] = node(ct, ref, **inputs)
        ref = [f"pre{i}", 0]

    def extra_apply(model_ref):
        out, r = {}, model_ref
        for i, (ct, inputs) in enumerate(after):
            if ct == "Apply":
                out.update(graphs.second_apply(r))
                r = ["apply2", 0]
            else:
                out[f"post{i}"] = node(ct, r, **inputs)
                r = [f"post{i}", 0]
        return out

    p = graphs.dressing_prompt(capture_key=key, steps=1, pre_model=pre or None, patched=dressed,
                               extra_apply=extra_apply if after else None, **kw)
    if dressed:
        p["gnet"]["inputs"]["model"] = ["model", 0]  # both orders encode the same garments
    if not dressed and after:  # undressed: the patches straight on the MODEL, in order
        r = ref
        for i, (ct, inputs) in enumerate(after):
            p[f"post{i}"] = node(ct, r, **inputs)
            r = [f"post{i}", 0]
        p["sampler"]["inputs"]["model"] = r
    if capture_model:
        p["cap"] = {"class_type": "ADTestCaptureModel", "inputs": {"key": key + "_model", "model": ["apply", 0]}}
    if seed_rng:  # HyperTile picks its tiles with Python's random, ToMe its merge targets with torch's
        random.seed(0)
        torch.manual_seed(0)
    r = host.run(p)
    assert r["success"], r["errors"]
    return (store[key], store.get(key + "_model")) if capture_model else store[key]


PAG = ("PerturbedAttentionGuidance", {"scale": 3.0})
PAG0 = ("PerturbedAttentionGuidance", {"scale": 0.0})
SAG = ("SelfAttentionGuidance", {"scale": 0.5, "blur_sigma": 2.0})
FOREIGN = ("ADTestForeignAttn1", {"scale": 0.5})
CHAINING = ("ADTestChainingAttn1", {"scale": 0.9})


@pytest.mark.parametrize("order", ["before", "after"])
def test_pag_on_a_dressed_model_equals_pag_with_an_independent_garment_term(host, store, order):
    """PAG (scale 3) on a dressed MODEL, in either order, equals PAG on the plain MODEL with the garment term added
    by reference hooks; and PAG changes the dressed result (it was a no-op when the pack held the replace slot)."""
    # the reference dresses every row; PAG needs more than the 1x1 middle grid of an 8x8 latent (one token attends
    # only to itself, perturbed or not)
    kw = {"include_uncond": True, "latent_w": 128, "latent_h": 128}
    place = {"before": (PAG,)} if order == "before" else {"after": (PAG,)}
    dressed, model = sample(host, store, capture_model=True, **place, **kw)
    without_pag = sample(host, store, **({"before": (PAG0,)} if order == "before" else {"after": (PAG0,)}), **kw)
    assert rel(dressed, without_pag) > 1e-2
    (branch,) = host.pack_module("nodes.glue").garment_term(model).branches
    with reference_dressing(model.model.diffusion_model, branch, 0.7):
        reference = sample(host, store, dressed=False, after=(PAG,), **kw)
    assert rel(dressed, reference) < 1e-4


def test_sag_between_two_applies_keeps_the_first_garment_set(host, store):
    """Apply -> Self-Attention Guidance -> Apply equals SAG -> Apply -> Apply (the first set was lost on the middle
    layer when SAG took the replace slot between the two)."""
    size = {"latent_w": 128, "latent_h": 128}  # SAG needs more than the 1x1 middle grid of an 8x8 latent
    between = sample(host, store, after=(SAG, ("Apply", {})), **size)
    first = sample(host, store, before=(SAG,), after=(("Apply", {}),), **size)
    assert rel(between, first) < 1e-5
    one_set = sample(host, store, before=(SAG,), **size)
    assert rel(between, one_set) > 1e-3  # the second set acts


@pytest.mark.parametrize("foreign", [FOREIGN, CHAINING], ids=["replacing", "chaining"])
def test_a_replacement_on_every_layer_between_two_applies_loses_nothing_and_adds_nothing_twice(host, store,
                                                                                              foreign):
    """Another pack's attn1 replacement on all 16 layers, put between two Apply nodes or before both: the same
    result. A chaining one (it calls the replacement it replaced) gets the garments once, not once per wrapper."""
    between = sample(host, store, after=(foreign, ("Apply", {})))
    before = sample(host, store, before=(foreign,), after=(("Apply", {}),))
    assert rel(between, before) < 1e-5
    after_one = sample(host, store, after=(foreign,))
    before_one = sample(host, store, before=(foreign,))
    assert rel(after_one, before_one) < 1e-5


def test_sags_extra_pass_with_the_negative_alone_is_not_dressed(host, store, monkeypatch):
    """SAG runs the unconditional prediction again (calc_cond_batch(model, [uncond])): ComfyUI marks that chunk
    cond_or_uncond 0, but its conditioning is the negative, so it sees no garment (paper eq. 16)."""
    branch_mod = host.pack_module("anydressing_core.branch")
    seen = []
    original = branch_mod.DressingBranch.rows

    def recording(self, extra, batch):
        ranges = original(self, extra, batch)
        seen.append((tuple(extra.get("cond_or_uncond") or ()), batch, tuple(ranges)))
        return ranges

    monkeypatch.setattr(branch_mod.DressingBranch, "rows", recording)
    sample(host, store, after=(SAG,), latent_w=128, latent_h=128)
    calls = set(seen)
    assert ((1, 0), 2, ((1, 2),)) in calls  # the CFG pass: only the positive's row (second here) is dressed
    assert ((0,), 1, ()) in calls  # SAG's pass with the negative alone: nothing
    assert all(ranges == () for cou, _, ranges in calls if cou == (0,)), calls


@pytest.mark.parametrize("patch", [("HyperTile", {"tile_size": 32, "swap_size": 1, "max_depth": 1,
                                                  "scale_depth": False}),
                                   ("TomePatchModel", {"ratio": 0.5})], ids=["HyperTile", "ToMe"])
def test_garment_masks_with_tiling_or_token_merging_follow_the_whole_grid(host, store, monkeypatch, patch):
    """HyperTile tiles and ToMe merges the tokens of the self-attention; the garment term is computed on the layer's
    own token grid (kept before any patch), so masks land where they belong: both orders give the same result, and
    every layer's garment term sees its whole grid."""
    branch_mod = host.pack_module("anydressing_core.branch")
    grids = {}
    original = branch_mod.DressingBranch.output

    def recording(self, key, q, extra):
        shape = extra.get("activations_shape")
        grids.setdefault(key, set()).add((int(q.shape[0]), int(q.shape[1]), int(shape[0]),
                                          int(shape[-2]) * int(shape[-1])))
        return original(self, key, q, extra)

    monkeypatch.setattr(branch_mod.DressingBranch, "output", recording)
    size = {"latent_w": 128, "latent_h": 128, "masks": BOXES}
    after = sample(host, store, after=(patch,), **size)
    before = sample(host, store, before=(patch,), **size)
    assert rel(after, before) < 1e-5
    assert len(grids) == 16 and all(rows == act_rows and tokens == grid for seen_ in grids.values()
                                    for rows, tokens, act_rows, grid in seen_), grids
    plain = sample(host, store, before=(patch,), dressed=False, latent_w=128, latent_h=128)
    assert rel(after, plain) > 1e-3


def test_garment_guidance_refuses_garments_on_the_unconditional_rows(host):
    p = graphs.dressing_prompt(capture_key="gg_uncond", steps=1, include_uncond=True,
                               extra_apply=lambda r: {"guide": {"class_type": "AnyDressingGarmentGuidance",
                                                                "inputs": {"model": r, "garment_scale": 3.0}}})
    r = host.run(p)
    assert not r["success"]
    assert r["errors"][0]["exception_message"].strip() == (
        "[AnyDressing] Garment Guidance: Apply Dressing-Attention lets the unconditional rows see the garments "
        "(apply_to_uncond 'yes', or 'auto' with a file whose authors did so, e.g. DreamFit), so the unconditional "
        "prediction u already has them and garment guidance (u + s_g (g - u) + s_t (t - g)) would be plain CFG; set "
        "apply_to_uncond to 'no'")


def test_guidance_and_maps_accept_a_model_whose_layers_were_all_replaced_later(host, store):
    """Apply -> another pack's replacement on every layer -> Garment Guidance: still a dressed MODEL."""
    guided = sample(host, store, after=(FOREIGN, ("AnyDressingGarmentGuidance", {"garment_scale": 3.0})))
    plain_cfg = sample(host, store, after=(FOREIGN,))
    assert rel(guided, plain_cfg) > 1e-3
