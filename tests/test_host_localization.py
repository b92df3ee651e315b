"""Host: pose-driven Garment Masks, Garment Attention Maps and the no-bleed guarantee through the real ComfyUI."""

from __future__ import annotations

import json

import pytest
import torch

import graphs
from test_core_localization import PERSON, openpose

pytestmark = pytest.mark.host


def masks_prompt(pose, slots=("upper", "lower", "shoes"), width=64, height=96, **extra) -> dict:
    p = graphs.dressing_prompt(garments=[(i + 1, s) for i, s in enumerate(slots)], capture_key="unused")
    p["pose"] = {"class_type": "ADTestPose", "inputs": {"json": json.dumps(pose)}}
    inputs = {"width": width, "height": height, "grow": 0, "feather": 0, "person_index": 0,
              "garment_features": ["encode", 0], "pose_keypoint": ["pose", 0]}
    inputs.update(extra)
    p["masks"] = {"class_type": "AnyDressingGarmentMasks", "inputs": inputs}
    for k in ("sampler", "capture", "apply"):
        p.pop(k)
    p["cap"] = {"class_type": "ADTestCaptureMask", "inputs": {"key": "masks", "mask": ["masks", 1]}}
    return p


def test_pose_fixture_gives_regions_in_the_right_places(host, store):
    r = host.run(masks_prompt(openpose()))
    assert r["success"], r["errors"]
    m = store["masks"]
    assert m.shape == (3, 96, 64)  # the 512 x 768 canvas scaled to the 64 x 96 masks

    def at(k, xy):
        return float(m[k, int(xy[1] / 8), int(xy[0] / 8)])

    chest, thigh = (256, 270), (225, 430)
    assert at(0, chest) == 1 and at(0, thigh) == 0 and at(0, PERSON[10]) == 0
    assert at(1, thigh) == 1 and at(1, chest) == 0
    assert at(2, PERSON[10]) == 1 and at(2, chest) == 0 and at(2, thigh) == 0


def test_mask_beats_box_beats_pose_and_grow(host, store):
    p = masks_prompt(openpose(), boxes="-\n0, 0, 0.5, 0.5", grow=8)
    p["m3"] = {"class_type": "ADTestBoxMask", "inputs": {"width": 32, "height": 48, "x0": 0.5, "y0": 0.5, "x1": 1.0,
                                                        "y1": 1.0, "value": 0.5}}
    p["masks"]["inputs"]["mask_3"] = ["m3", 0]
    r = host.run(p)
    assert r["success"], r["errors"]
    m = store["masks"]
    assert float(m[1, :48, :32].min()) == 1 and float(m[1, 56:, 40:].max()) == 0  # the box, grown by 8 px
    assert float(m[2, 60, 50]) == 0.5 and float(m[2, 10, 10]) == 0  # the user mask (soft), resized to 64 x 96
    assert float(m[0, 270 // 8, 256 // 8]) == 1  # garment 1 from the pose


def test_pose_and_mask_errors(host):
    def error(p):
        r = host.run(p)
        assert not r["success"]
        return r["errors"][0]["exception_message"].strip()

    msg = error(masks_prompt([{"people": [], "canvas_width": 512, "canvas_height": 768}]))
    assert msg == "[AnyDressing] Garment Masks: garment 1 (upper): the pose has no person in it"
    no_ankles = {k: v for k, v in PERSON.items() if k not in (10, 13)}
    msg = error(masks_prompt(openpose(no_ankles)))
    assert msg == ("[AnyDressing] Garment Masks: garment 2 (lower): the pose lacks the keypoints slot 'lower' needs "
                   "(hips to ankles): right ankle, left ankle")
    msg = error(masks_prompt(openpose(), slots=("upper", "bag")))
    assert msg == "[AnyDressing] Garment Masks: garment 2 (bag): slot 'bag' has no pose rule; give it a mask or a box"
    # masks of another aspect ratio than the generated image
    p = graphs.dressing_prompt(masks=[(0, 0, 1, 1, 1.0), (0, 0, 1, 1, 1.0)])
    for node in ("masks", "mask1", "mask2"):  # masks drawn at 64x128 (Garment Masks accepts its own aspect)
        p[node]["inputs"].update(width=64, height=128)
    msg = error(p)
    assert msg == ("[AnyDressing] Apply Dressing-Attention: the garment masks are 64x128 (WxH) but the image being "
                   "generated is 64x64 (latent 8x8); make the masks the size of the generated image")


def maps_prompt(masks=None, **kw):
    p = graphs.dressing_prompt(masks=masks, **kw)
    p["maps"] = {"class_type": "AnyDressingGarmentAttentionMaps",
                 "inputs": {"model": ["apply", 0], "positive": ["pos", 0], "latent": ["sampler", 0],
                            "at_percent": 0.5, "seed": 3, "batch_index": 0}}
    p["cap_maps"] = {"class_type": "ADTestCaptureMask", "inputs": {"key": "maps", "mask": ["maps", 1],
                                                                   "image": ["maps", 0]}}
    return p


def test_attention_maps_sum_as_the_softmax_says(host, store):
    r = host.run(maps_prompt())
    assert r["success"], r["errors"]
    maps = store["maps"]
    assert maps.shape == (2, 64, 64)
    assert store["maps_image"].shape == (2, 64, 64, 3)
    torch.testing.assert_close(maps.sum(0), torch.ones(64, 64), atol=1e-5, rtol=0)  # no masks: one softmax
    assert float(maps.min()) >= 0 and float(maps[0].std()) > 0
    # with masks: garment 1 left half, garment 2 right half. Each layer's A_k is exactly 0 outside its resized mask
    # (core and per-layer tests); the average over layers keeps a little of the coarsest grids (the 1 x 1 middle
    # block sees both halves) and of the bilinear upsampling near the border.
    r = host.run(maps_prompt(masks=[(0, 0, 0.5, 1, 1.0), (0.5, 0, 1, 1, 1.0)]))
    assert r["success"], r["errors"]
    maps = store["maps"]
    assert float(maps[0, :, 40:].max()) < 0.15 and float(maps[1, :, :24].max()) < 0.15
    assert float(maps[0, :, :24].min()) > 0.85 and float(maps[1, :, 40:].min()) > 0.85
    torch.testing.assert_close(maps.sum(0), torch.ones(64, 64), atol=1e-5, rtol=0)  # every pixel sees a garment


def test_encode_and_maps_tick_comfyui_progress_bar_per_layer(host):
    """The node's bar in the editor moves per layer, as KSampler's does per step (ComfyUI's progress hook)."""
    import adtest_tiny
    import comfy.utils
    from comfy_execution.utils import get_executing_context

    layers = len(host.pack_module("nodes.glue").self_attention_layers(
        adtest_tiny.tiny_model_patcher(0).model.diffusion_model))
    ticks: dict = {}

    def hook(value, total, preview, prompt_id=None, node_id=None):
        ctx = get_executing_context()
        ticks.setdefault(node_id or (ctx.node_id if ctx else None), []).append((value, total))

    previous = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        r = host.run(maps_prompt(garments=((31, "upper"), (32, "lower"))))  # new garments: nothing cached
    finally:
        comfy.utils.set_progress_bar_global_hook(previous)
    assert r["success"], r["errors"]
    assert layers == 16
    assert ticks["encode"] == [(i, layers) for i in range(1, layers + 1)]
    assert ticks["maps"] == [(i, layers) for i in range(1, layers + 1)]  # one Apply: one branch per layer
    assert len(ticks["sampler"]) == 2  # KSampler's own, for comparison: one per step


def test_changing_garment_2_leaves_every_layer_outside_its_mask_bit_identical(host):
    """At all 16 layers, for the same queries, garment 2's tokens reach no query outside mask 2."""
    import adtest_tiny

    enc = host.pack_module("nodes.encode_garments")
    gn = host.pack_module("nodes.load_garments_net")
    apply = host.pack_module("nodes.apply_dressing_attention")
    base = adtest_tiny.tiny_model_patcher(0)
    gnet = gn.load("training-free", None, base)
    g = torch.Generator().manual_seed(5)
    lat = torch.randn(2, 4, 8, 6, generator=g)
    lat_b = lat.clone()
    lat_b[1] = torch.randn(4, 8, 6, generator=g)  # garment 2 replaced
    masks = torch.zeros(2, 64, 64)
    masks[0] = 1.0
    masks[1, :, 32:] = 1.0
    masks[1, :32, 32:40] = 0.4  # soft part
    outs = []
    for latents in (lat, lat_b):
        feats = enc.encode(gnet, latents, ["upper", "lower"])
        m = apply.apply(base, feats, 0.7, "", 0.0, 1.0, False, masks)
        (branch,) = host.pack_module("nodes.glue").garment_term(m).branches
        outs.append(branch)
    assert len(outs[0].layers) == 16
    checked = 0
    for key in outs[0].layers:
        rep_a, rep_b = outs
        c = rep_a.layers[key].features.shape[-1]
        h = {("input", 1, 0): 8, ("input", 2, 0): 8}.get(key, None)
        grid = {32: 8, 64: 4, 128: 2}[c] if key[0] != "middle" else 1
        h = w = grid if h is None else h
        q = torch.randn(2, h * w, c, generator=g)
        extra = {"n_heads": 8, "cond_or_uncond": [0], "activations_shape": [2, c, h, w],
                 "original_shape": [2, 4, 8, 8]}
        (_, _, a), = rep_a.output(key, q, extra)  # lambda G for the rows that see the garments
        (_, _, b), = rep_b.output(key, q, extra)
        outside = rep_a.layer_masks(extra, h * w, q.device, None)[1] == 0
        assert torch.equal(a[:, outside], b[:, outside]), key
        if (~outside).any():
            assert not torch.equal(a[:, ~outside], b[:, ~outside]), key
        checked += 1
    assert checked == 16
