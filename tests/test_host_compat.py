"""Host: the compatibility matrix of Apply Dressing-Attention with ComfyUI's own model patches and graph shapes.

Each cell runs the real nodes through the real executor on the tiny SD1.5-architecture fixture (8x8 latent, 1 step).
"Works" means: the garments still act (the output differs from the same graph without dressing) and every dressed
layer reaches the garment branch in every model evaluation (no layer silently undressed); where the composition is
exact, the two orders give the same result. "Refused" means an `[AnyDressing]` error naming the other node and
the fix. docs/compatibility.md lists the same cells.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch

import graphs
from compare import rel

pytestmark = pytest.mark.host

LAYERS = 16  # self-attention layers of the SD1.5-architecture fixture


@pytest.fixture
def calls(host, monkeypatch):
    """Counts DressingBranch.output calls per layer: one per model evaluation and layer when nothing is lost."""
    branch_mod = host.pack_module("anydressing_core.branch")
    seen: Counter = Counter()
    original = branch_mod.DressingBranch.output

    def counting(self, key, q, extra):
        seen[key] += 1
        return original(self, key, q, extra)

    monkeypatch.setattr(branch_mod.DressingBranch, "output", counting)
    return seen


def model_patch(class_type: str, **inputs):
    """(node id, builder) that puts `class_type` on a MODEL reference."""
    def build(model_ref):
        return {"patch": {"class_type": class_type, "inputs": {"model": model_ref, **inputs}}}
    return build


PATCHES = {
    "PerturbedAttentionGuidance": model_patch("PerturbedAttentionGuidance", scale=3.0),
    "SelfAttentionGuidance": model_patch("SelfAttentionGuidance", scale=0.5, blur_sigma=2.0),
    "HyperTile": model_patch("HyperTile", tile_size=32, swap_size=1, max_depth=1, scale_depth=False),
    "TomePatchModel": model_patch("TomePatchModel", ratio=0.5),
    "PatchModelAddDownscale": model_patch("PatchModelAddDownscale", block_number=1, downscale_factor=2.0,
                                          start_percent=0.0, end_percent=1.0, downscale_after_skip=True,
                                          downscale_method="bicubic", upscale_method="bicubic"),
    "FreeU_V2": model_patch("FreeU_V2", b1=1.3, b2=1.4, s1=0.9, s2=0.2),
    "RescaleCFG": model_patch("RescaleCFG", multiplier=0.7),
    "ADTestForeignAttn1": model_patch("ADTestForeignAttn1", scale=0.5),
    "LoRA": model_patch("ADTestAddLoRA", seed=4, strength=1.0, merge=False),
}


# SAG and FreeU need more than the 1x1 middle grid an 8x8 latent gives (they fail on it without dressing too)
LATENT = {"SelfAttentionGuidance": 128, "FreeU_V2": 128}
_RUNS = [0]


def prompt(key: str, **kw) -> tuple[dict, str]:
    """A dressing prompt whose capture key is unique (ComfyUI's cache would skip a graph identical to an earlier
    test's) and whose GarmentsNet always takes the plain MODEL, so both orders encode the same garment features."""
    _RUNS[0] += 1
    unique = f"{key}#{_RUNS[0]}"
    p = graphs.dressing_prompt(capture_key=unique, steps=1, **kw)
    if "gnet" in p:
        p["gnet"]["inputs"]["model"] = ["model", 0]
    return p, unique


def run(host, store, key, *, patch=None, order="after", seed_rng=True, **kw) -> torch.Tensor:
    """One graph: the patch before (on the MODEL Apply takes) or after (on Apply's output) the dressing."""
    if patch in LATENT:
        kw.setdefault("latent_w", LATENT[patch])
        kw.setdefault("latent_h", LATENT[patch])
    if patch is not None and order == "before":
        kw["pre_model"] = PATCHES[patch](["model", 0])
    elif patch is not None and kw.get("patched", True):
        kw["extra_apply"] = PATCHES[patch]
    elif patch is not None:  # no dressing: the patch straight on the MODEL
        kw["pre_model"] = PATCHES[patch](["model", 0])
    if seed_rng:  # HyperTile picks its tiles with Python's random, ToMe its merge targets with torch's
        random.seed(0)
        torch.manual_seed(0)
    p, unique = prompt(key, **kw)
    r = host.run(p)
    assert r["success"], r["errors"]
    store[key] = store[unique]
    return store[key]


def assert_every_layer_dressed(calls: Counter) -> None:
    assert len(calls) == LAYERS, sorted(calls)
    assert len(set(calls.values())) == 1, dict(calls)  # the same number of evaluations reached every layer


def run_error(host, prompt) -> str:
    r = host.run(prompt)
    assert not r["success"]
    return r["errors"][0]["exception_message"].strip()


# ---- model patches, before and after Apply Dressing-Attention: works, and both orders give the same result ----

EXACT_BOTH_ORDERS = ["PerturbedAttentionGuidance", "SelfAttentionGuidance", "HyperTile", "TomePatchModel",
                     "PatchModelAddDownscale", "FreeU_V2", "ADTestForeignAttn1", "LoRA"]


_MEMO: dict = {}


def memo_run(host, store, calls, patch: str, order: str) -> tuple[torch.Tensor, Counter]:
    """The dressed (or, order 'none', undressed) graph with `patch`, run once per session: cells share runs."""
    if (patch, order) not in _MEMO:
        calls.clear()
        out = run(host, store, f"{patch}-{order}", patch=patch, order=order if order != "none" else "after",
                  patched=order != "none")
        _MEMO[(patch, order)] = (out, Counter(calls))
    return _MEMO[(patch, order)]


@pytest.mark.parametrize("patch", EXACT_BOTH_ORDERS)
@pytest.mark.parametrize("order", ["before", "after"])
def test_model_patch_keeps_garments_on_every_layer(host, store, calls, patch, order):
    without, _ = memo_run(host, store, calls, patch, "none")
    dressed, seen = memo_run(host, store, calls, patch, order)
    assert_every_layer_dressed(seen)
    assert rel(dressed, without) > 1e-2
    other, _ = memo_run(host, store, calls, patch, "after" if order == "before" else "before")
    assert rel(dressed, other) < 1e-5  # the order of the two nodes does not matter


def test_pag_and_sag_after_dressing_equal_before_and_dress_their_extra_pass(host, store, calls):
    """PAG's perturbed pass and SAG's degraded pass replace the middle attn1 after us: the garments stay there."""
    for patch, passes in (("PerturbedAttentionGuidance", 2), ("SelfAttentionGuidance", 2)):
        calls.clear()
        run(host, store, "x", patch=patch, order="after")
        assert calls[("middle", 0, 0)] == passes  # 1 step: the cond+uncond pass and the guidance's own pass


def test_rescale_cfg_before_and_after(host, store, calls):
    for order in ("before", "after"):
        calls.clear()
        dressed = run(host, store, order, patch="RescaleCFG", order=order)
        assert_every_layer_dressed(calls)
    without = run(host, store, "without", patch="RescaleCFG", patched=False)
    assert rel(store["after"], without) > 1e-2
    assert torch.equal(store["after"], store["before"])


# ---- masks need the whole grid: area crops are refused, Deep Shrink works (tiling and merging: stacking tests) ----

BOXES = [(0, 0, 1, 0.5, 1.0), (0, 0.5, 1, 1, 1.0)]


@pytest.mark.parametrize("order", ["before", "after"])
def test_deep_shrink_with_masks_follows_the_shrunk_grid(host, store, calls, order):
    without = run(host, store, "without", patch="PatchModelAddDownscale", patched=False)
    calls.clear()
    dressed = run(host, store, "dressed", patch="PatchModelAddDownscale", order=order, masks=BOXES)
    assert_every_layer_dressed(calls)
    assert rel(dressed, without) > 1e-2
    zero = run(host, store, "zero", patch="PatchModelAddDownscale", order=order,
               masks=[(0, 0, 0, 0, 1.0), (0, 0, 0, 0, 1.0)])
    assert torch.equal(zero, without)  # all-zero masks on the shrunk grids: exactly the undressed graph


# ---- conditioning-side nodes (order-free: they act on the conditioning, not the MODEL) ----

def with_area(p: dict, mask_bounds: bool = False, use_mask: bool = False) -> dict:
    if use_mask:
        p["cmask"] = {"class_type": "ADTestBoxMask", "inputs": {"width": 128, "height": 128, "x0": 0, "y0": 0,
                                                               "x1": 1, "y1": 0.5, "value": 1.0}}
        p["area"] = {"class_type": "ConditioningSetMask",
                     "inputs": {"conditioning": ["pos", 0], "mask": ["cmask", 0], "strength": 1.0,
                                "set_cond_area": "mask bounds" if mask_bounds else "default"}}
    else:
        p["area"] = {"class_type": "ConditioningSetArea",
                     "inputs": {"conditioning": ["pos", 0], "width": 128, "height": 64, "x": 0, "y": 0,
                                "strength": 1.0}}
    p["both"] = {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["area", 0],
                                                                 "conditioning_2": ["pos", 0]}}
    p["sampler"]["inputs"]["positive"] = ["both", 0]
    return p


@pytest.mark.parametrize("node", ["ConditioningSetArea", "ConditioningSetMask"])
def test_area_and_mask_conditioning_without_masks_works(host, store, calls, node):
    use_mask = node == "ConditioningSetMask"
    assert host.run(with_area(graphs.dressing_prompt(capture_key="without", steps=1, patched=False, latent_w=128, latent_h=128),
                              use_mask=use_mask))["success"]
    calls.clear()
    r = host.run(with_area(graphs.dressing_prompt(capture_key="dressed", steps=1, latent_w=128, latent_h=128), use_mask=use_mask))
    assert r["success"], r["errors"]
    assert_every_layer_dressed(calls)
    assert rel(store["dressed"], store["without"]) > 1e-2


def test_conditioning_set_mask_default_area_with_garment_masks_works(host, store):
    r = host.run(with_area(graphs.dressing_prompt(capture_key="dressed", steps=1, masks=BOXES, latent_w=128, latent_h=128), use_mask=True))
    assert r["success"], r["errors"]
    assert host.run(with_area(graphs.dressing_prompt(capture_key="without", steps=1, patched=False, latent_w=128, latent_h=128),
                              use_mask=True))["success"]
    assert rel(store["dressed"], store["without"]) > 1e-2


@pytest.mark.parametrize("mask_bounds", [False, True], ids=["ConditioningSetArea", "ConditioningSetMask-bounds"])
def test_area_crop_with_garment_masks_is_refused(host, mask_bounds):
    p = with_area(graphs.dressing_prompt(capture_key="x", steps=1, masks=BOXES, latent_w=128, latent_h=128), mask_bounds=mask_bounds,
                  use_mask=mask_bounds)
    msg = run_error(host, p)
    assert msg.startswith("[AnyDressing] Apply Dressing-Attention: the model runs on a 16x8 crop of the 16x16 latent "
                          "(area conditioning, e.g. ConditioningSetArea")
    assert "Disconnect garment_masks" in msg


def test_controlnet_with_dressing(host, store, calls):
    def cn(p):
        p["cn"] = {"class_type": "ADTestTinyControlNet", "inputs": {"seed": 3}}
        p["hint"] = {"class_type": "ADTestGarmentImage", "inputs": {"seed": 21, "width": 64, "height": 64}}
        p["cn_apply"] = {"class_type": "ControlNetApplyAdvanced",
                         "inputs": {"positive": ["pos", 0], "negative": ["neg", 0], "control_net": ["cn", 0],
                                    "image": ["hint", 0], "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0}}
        p["sampler"]["inputs"]["positive"] = ["cn_apply", 0]
        p["sampler"]["inputs"]["negative"] = ["cn_apply", 1]
        return p

    assert host.run(cn(graphs.dressing_prompt(capture_key="without", steps=1, patched=False, latent_w=128, latent_h=128)))["success"]
    calls.clear()
    assert host.run(cn(graphs.dressing_prompt(capture_key="dressed", steps=1, latent_w=128, latent_h=128)))["success"]
    assert_every_layer_dressed(calls)
    assert rel(store["dressed"], store["without"]) > 1e-2


def test_batch_of_eight_latents_dresses_every_row(host, store, calls):
    without = run(host, store, "without", patched=False, batch=8)
    calls.clear()
    dressed = run(host, store, "dressed", batch=8)
    assert_every_layer_dressed(calls)
    assert dressed.shape[0] == 8
    for i in range(8):
        assert rel(dressed[i], without[i]) > 1e-2, i
    single = run(host, store, "single", batch=1)
    assert rel(dressed[:1], single) < 1e-4  # row 0 of the batch is the single-latent run (same noise)


# ---- two Apply nodes, Garment Guidance ----

second_apply = graphs.second_apply


def test_second_apply_adds_a_branch_on_every_layer(host, store, calls):
    single = run(host, store, "single")
    calls.clear()
    both = run(host, store, "both", extra_apply=second_apply)
    assert len(calls) == LAYERS and set(calls.values()) == {2}  # both branches on every layer, once each
    assert rel(both, single) > 1e-3


def test_two_apply_nodes_in_either_order_give_the_same_result(host, store):
    """Two branches are summed: swapping which Apply node comes first only reorders a sum."""
    first = run(host, store, "first", extra_apply=second_apply)

    def swapped(p: dict) -> dict:  # apply2 (shoes) on the plain MODEL, apply (upper, lower) on its output
        p["apply2"]["inputs"]["model"] = ["model", 0]
        p["apply"]["inputs"]["model"] = ["apply2", 0]
        p["sampler"]["inputs"]["model"] = ["apply", 0]
        return p

    p, key = prompt("swapped", extra_apply=second_apply)
    r = host.run(swapped(p))
    assert r["success"], r["errors"]
    assert rel(store[key], first) < 1e-5


def guidance(model_ref):
    return {"guide": {"class_type": "AnyDressingGarmentGuidance", "inputs": {"model": model_ref,
                                                                            "garment_scale": 2.5}}}


def test_garment_guidance_after_dressing_works_and_before_is_refused(host, store):
    plain_cfg = run(host, store, "plain_cfg")
    guided = run(host, store, "guided", extra_apply=guidance)
    assert rel(guided, plain_cfg) > 1e-3
    p = graphs.dressing_prompt(capture_key="x", steps=1, pre_model=guidance(["model", 0]))
    msg = run_error(host, p)
    assert msg == ("[AnyDressing] Garment Guidance: the MODEL has no Dressing-Attention: connect the MODEL output of "
                   "Apply Dressing-Attention")


def test_garment_guidance_with_a_later_cfg_function_is_refused_not_silently_lost(host):
    def guided_then_rescale(model_ref):
        return {**guidance(model_ref),
                "rescale": {"class_type": "RescaleCFG", "inputs": {"model": ["guide", 0], "multiplier": 0.7}}}

    msg = run_error(host, graphs.dressing_prompt(capture_key="x", steps=1, extra_apply=guided_then_rescale))
    assert msg.startswith("[AnyDressing] Garment Guidance: a node after Garment Guidance replaced the MODEL's CFG "
                          "function (RescaleCFG.patch.<locals>.rescale_cfg, ")
    assert msg.endswith("remove that node or Garment Guidance")

    def rescale_then_guided(model_ref):
        return {"rescale": {"class_type": "RescaleCFG", "inputs": {"model": model_ref, "multiplier": 0.7}},
                "guide": {"class_type": "AnyDressingGarmentGuidance",
                          "inputs": {"model": ["rescale", 0], "garment_scale": 2.5}}}

    msg = run_error(host, graphs.dressing_prompt(capture_key="x", steps=1, extra_apply=rescale_then_guided))
    assert msg == ("[AnyDressing] Garment Guidance: another node already replaced this MODEL's CFG; put Garment "
                   "Guidance before it or remove one of them")


# ---- a wrapped replacement's models reach ComfyUI's model management ----
