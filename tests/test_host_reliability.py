"""Host: cancel, isolation, dtypes and offload, bad input, and fuzzed files through Load GarmentsNet."""

from __future__ import annotations

import logging
import re
import random

import pytest
import torch

import graphs
from compare import rel
from anydressing_core.native_format import write_native
from test_core_fuzz import mutate

pytestmark = pytest.mark.host


def run(host, store, key, **kw):
    r = host.run(graphs.dressing_prompt(capture_key=key, **kw))
    assert r["success"], r["errors"]
    return store[key]



def test_interrupt_mid_sampling_leaves_no_state(host, store, monkeypatch):
    import gc
    import weakref

    reference = run(host, store, "reference", steps=3)
    branch_mod = host.pack_module("anydressing_core.branch")
    projected = []
    original_project = branch_mod.DressingLayer.project

    def watched_project(self, device, dtype):
        out = original_project(self, device, dtype)
        projected.extend(weakref.ref(t) for t in out)
        return out

    monkeypatch.setattr(branch_mod.DressingLayer, "project", watched_project)
    interrupt = {"stop": {"class_type": "ADTestInterruptAt", "inputs": {"model": ["model", 0], "call": 2,
                                                                        "sleep": 0.0}}}
    p = graphs.dressing_prompt(capture_key="interrupted", steps=3, pre_model=interrupt)
    p["cap_model"] = {"class_type": "ADTestCaptureModel", "inputs": {"key": "patched", "model": ["apply", 0]}}
    r = host.run(p)
    assert not r["success"] and "interrupted" not in store
    gc.collect()  # the run's K'/V' (made before the interruption) were dropped in the wrapper's finally
    assert len(projected) == 32 and all(r() is None for r in projected)
    patched = store["patched"]
    assert "anydressing_run_cache" not in patched.model_options["transformer_options"]
    # the next prompt gives the same result as before the interruption
    again = run(host, store, "again", steps=3)
    assert torch.equal(again, reference)


def test_two_apply_branches_of_one_graph_do_not_see_each_other(host, store):
    a = run(host, store, "a", garments=((1, "upper"),))
    b = run(host, store, "b", garments=((5, "lower"),))
    p = graphs.dressing_prompt(capture_key="a2", garments=((1, "upper"),))
    p["img_b"] = {"class_type": "ADTestGarmentImage", "inputs": {"seed": 5, "width": 64, "height": 80}}
    p["enc_b"] = {"class_type": "AnyDressingEncodeGarments",
                  "inputs": {"garments_net": ["gnet", 0], "vae": ["vae", 0], "image_1": ["img_b", 0],
                             "slot_1": "lower", "width": 48, "height": 64}}
    p["apply_b"] = {"class_type": "AnyDressingApplyDressingAttention",
                    "inputs": {**p["apply"]["inputs"], "garment_features": ["enc_b", 0]}}
    p["sampler_b"] = {"class_type": "KSampler", "inputs": {**p["sampler"]["inputs"], "model": ["apply_b", 0]}}
    p["capture_b"] = {"class_type": "ADTestCaptureLatent", "inputs": {"key": "b2", "samples": ["sampler_b", 0]}}
    r = host.run(p)
    assert r["success"], r["errors"]
    assert torch.equal(store["a2"], a) and torch.equal(store["b2"], b)
    assert not torch.equal(a, b)


def test_weight_dtypes_and_offloaded_garments_net(host, store):
    import comfy.model_management as mm

    fp32 = run(host, store, "fp32")
    plain = run(host, store, "plain", patched=False)
    mm.unload_all_models()
    host.reset_cache()  # empty node cache: GarmentsNet encodes again after being offloaded
    assert torch.equal(run(host, store, "reloaded"), fp32)
    for dtype, tol in (("float16", 0.02), ("bfloat16", 0.1)):
        p = graphs.dressing_prompt(capture_key=dtype)
        p["model"]["inputs"]["weight_dtype"] = dtype
        r = host.run(p)
        assert r["success"], r["errors"]
        assert rel(store[dtype], fp32) < tol, dtype
        assert rel(store[dtype], fp32) < rel(fp32, plain) / 3, dtype


def encode_node(host, **images):
    cls = host.nodes.NODE_CLASS_MAPPINGS["AnyDressingEncodeGarments"]
    import adtest_tiny

    gn = host.pack_module("nodes.load_garments_net")
    gnet = gn.load("training-free", None, adtest_tiny.tiny_model_patcher(0))
    return cls.execute(gnet, adtest_tiny.tiny_vae(0), slot_1="upper", width=48, height=64, **images).args


def test_odd_images_are_converted_and_said(host, caplog):
    g = torch.Generator().manual_seed(0)
    gray = torch.rand(1, 80, 64, 1, generator=g)
    rgba = torch.rand(1, 100, 64, 4, generator=g)
    flat = torch.full((1, 64, 64, 3), 0.5) + 0.002 * torch.rand(1, 64, 64, 3, generator=g)
    huge = torch.rand(1, 1, 1, 3, generator=g).expand(1, 10000, 10000, 3)  # a view: no 1.2 GB allocation
    with caplog.at_level(logging.WARNING):
        feats, pixels = encode_node(host, image_1=gray, image_2=rgba, slot_2="lower", image_3=flat,
                                    slot_3="hat", image_4=huge, slot_4="bag")
    assert feats.count == 4 and pixels.shape == (4, 64, 48, 3)
    assert "image_4 is 10000x10000; it is downscaled to at most 4096 pixels a side" in caplog.text
    assert torch.isfinite(pixels).all() and float(pixels.min()) >= 0 and float(pixels.max()) <= 1
    assert "Encode Garments: image_1 has one channel (grayscale); it is encoded as gray, so the garment's colour " \
           "comes from the prompt, not the photo" in caplog.text
    std = float(flat.reshape(-1, 3).std(dim=0).max())
    assert f"Encode Garments: image_3 is nearly one flat colour (pixel standard deviation {std:.4f}); check that " \
           f"the garment photo, not a blank or solid image, is connected" in caplog.text
    assert "image_4 is nearly one flat colour (pixel standard deviation 0.0000)" in caplog.text
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not any("image_2" in m for m in warned), warned  # a colourful RGBA garment passes without a word

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        encode_node(host, image_1=torch.rand(1, 80, 64, 1, generator=g).repeat(1, 1, 1, 3))
    assert "image_1 has no colour (all three channels are equal: a grayscale photo)" in caplog.text


@pytest.mark.parametrize("size", [(1, 1), (63, 200), (200, 63)])
def test_too_small_garment_images_are_refused_naming_the_garment(host, size):
    w, h = size
    g = torch.Generator().manual_seed(1)
    with pytest.raises(Exception, match=re.escape(
            f"[AnyDressing] Encode Garments: image_2 is {w}x{h} pixels; a garment image needs at least 64 pixels on "
            f"each side (it is scaled to 48x64 and would encode as a blur): load a larger photo of garment 2")):
        encode_node(host, image_1=torch.rand(1, 64, 64, 3, generator=g), image_2=torch.rand(1, h, w, 3, generator=g),
                    slot_2="lower")


def test_bad_images_and_masks_get_node_errors(host):
    with pytest.raises(Exception, match=r"\[AnyDressing\] Encode Garments: image_1: the garment image contains NaN "
                                         r"or infinite values; connect an RGB IMAGE"):
        encode_node(host, image_1=torch.full((1, 64, 64, 3), float("nan")))
    with pytest.raises(Exception, match=r"Encode Garments: image_1: the garment image batch is empty"):
        encode_node(host, image_1=torch.zeros(0, 64, 64, 3))
    with pytest.raises(Exception, match=r"Encode Garments: 17 garments given; at most 16"):
        encode_node(host, image_1=torch.rand(17, 64, 64, 3))
    masks = host.nodes.NODE_CLASS_MAPPINGS["AnyDressingGarmentMasks"]
    with pytest.raises(Exception, match=r"\[AnyDressing\] Garment Masks: mask_1: garment masks contain NaN or "
                                         r"infinite values; fix the mask that feeds it"):
        masks.execute(64, 64, 0, 0, 0, mask_1=torch.full((1, 8, 8), float("inf")))
    with pytest.raises(Exception, match=r"Garment Masks: no garment to build a mask for"):
        masks.execute(64, 64, 0, 0, 0)
    with pytest.raises(Exception, match=re.escape(
            "[AnyDressing] Garment Masks: mask_2 is 512x512 pixels (aspect 1.000) but the masks are made at width x "
            "height = 576x768 (aspect 0.750); stretching it would move the garment's region: set width and height to "
            "the size of the image the mask was drawn on, or crop the mask to 576x768's aspect first")):
        masks.execute(576, 768, 0, 0, 0, mask_1=torch.ones(1, 768, 576), mask_2=torch.ones(1, 512, 512))
    same_shape = torch.zeros(1, 1333, 1000)  # a phone-size mask of the same 3:4 shape is scaled, not refused
    same_shape[:, :667] = 1.0
    _, built = masks.execute(576, 768, 0, 0, 0, mask_1=same_shape).args
    assert built.shape == (1, 768, 576)
    assert float(built[0, :380].min()) == 1.0 and float(built[0, 388:].max()) == 0.0


def test_fuzzed_files_through_load_garments_net_and_encode(host):
    """Every mutated file ends in the pack's own error or a valid load and encode; nothing else escapes."""
    import adtest_tiny

    gn = host.pack_module("nodes.load_garments_net")
    enc = host.pack_module("nodes.encode_garments")
    node_error = host.pack_module("nodes.glue").NodeError
    base = adtest_tiny.tiny_model_patcher(0)
    sd = adtest_tiny.tiny_unet_state_dict(0)
    g = torch.Generator().manual_seed(0)
    paths = ["input_blocks.1.1.transformer_blocks.0", "output_blocks.9.1.transformer_blocks.0"]
    loras = {p: {"q": (torch.randn(2, 32, generator=g), torch.randn(32, 2, generator=g), 1.0)} for p in paths}
    dressing = {p: (sd[f"{p}.attn1.to_k.weight"], sd[f"{p}.attn1.to_v.weight"]) for p in paths}
    seed_path = host.anydressing_dir() / "fuzz_seed.safetensors"
    write_native(str(seed_path), loras={"upper": loras}, dressing=dressing)
    data = seed_path.read_bytes()
    rng = random.Random(99)
    latents = torch.randn(1, 4, 8, 6, generator=g)
    outcomes = {"node_error": 0, "loaded_and_encoded": 0}
    for i in range(60):
        path = host.anydressing_dir() / f"fuzz_{i}.safetensors"
        path.write_bytes(mutate(data, rng))
        try:
            gnet = gn.load(path.name, str(path), base)
            enc.encode(gnet, latents, ["upper"])
            outcomes["loaded_and_encoded"] += 1
        except node_error:
            outcomes["node_error"] += 1
        path.unlink()
    print("fuzz outcomes", outcomes)
    assert outcomes["node_error"] > 0 and outcomes["loaded_and_encoded"] > 0, outcomes


def test_sixteen_bit_png_through_load_image(host, store):
    """A 16-bit grayscale PNG, loaded by ComfyUI's own LoadImage, is converted and encoded."""
    import numpy as np
    from PIL import Image

    inputs = host.base / "input"
    inputs.mkdir(parents=True, exist_ok=True)
    ramp = (np.linspace(0, 65535, 64 * 80).reshape(80, 64)).astype(np.uint16)
    img = Image.new("I;16", (64, 80))
    img.frombytes(ramp.tobytes())
    img.save(inputs / "garment16.png")
    assert Image.open(inputs / "garment16.png").mode.startswith("I")
    p = graphs.dressing_prompt(capture_key="png16")
    p["img1"] = {"class_type": "LoadImage", "inputs": {"image": "garment16.png"}}
    r = host.run(p)
    assert r["success"], r["errors"]
    assert torch.isfinite(store["png16"]).all()


LORA = {"lora": {"class_type": "ADTestAddLoRA",
                 "inputs": {"model": ["model", 0], "seed": 4, "strength": 1.0, "merge": False}}}


def undressed_two_loads(host, store, key):
    """The control: no pack node, the same loads as a dressed training-free graph (a clone of the LoRA MODEL is
    loaded first, as Encode Garments does, then the MODEL to sample), through two KSamplers."""
    p = graphs.dressing_prompt(capture_key=key + "_first", patched=False, pre_model=LORA, steps=1)
    p["clone"] = {"class_type": "ModelSamplingDiscrete", "inputs": {"model": ["lora", 0], "sampling": "eps",
                                                                     "zsnr": False}}
    p["sampler"]["inputs"]["model"] = ["clone", 0]
    p["sampler2"] = {"class_type": "KSampler", "inputs": dict(p["sampler"]["inputs"], model=["lora", 0], seed=7)}
    p["capture2"] = {"class_type": "ADTestCaptureLatent", "inputs": {"key": key, "samples": ["sampler2", 0]}}
    r = host.run(p)
    assert r["success"], r["errors"]
    return store[key]


@pytest.mark.parametrize("budget", [0.1, 2 * 2**20], ids=["novram-like", "lowvram-like"])
def test_partial_load_paths_give_the_same_result(host, store, monkeypatch, budget):
    """--novram/--lowvram need a GPU; on the CPU, ComfyUI's same partial-load path (weights cast per layer, LoRA
    applied through weight functions) is forced by giving the model a tiny memory budget.

    The budget is handed out as load_models_gpu does on a GPU: a model already (partly) loaded gets only what is
    left of it. (Handing the whole budget again at every load makes ComfyUI v0.8.0 move a module that holds its
    LoRA baked in to the run-time patch path, so the LoRA counts twice: the undressed control below then differs
    from the full load by 0.29 too. Garment K'/V' and the training-free GarmentsNet read the weights only through
    the layers' own forward, so they get whatever the host applies.)"""
    import comfy.model_management as mm

    host.reset_cache()
    full = run(host, store, "full", pre_model=LORA)
    full_control = undressed_two_loads(host, store, "full_control")
    original = mm.LoadedModel.model_load

    def partial(self, lowvram_model_memory=0, force_patch_weights=False):
        return original(self, max(budget - self.model.loaded_size(), 0.1), force_patch_weights=force_patch_weights)

    monkeypatch.setattr(mm.LoadedModel, "model_load", partial)
    host.reset_cache()
    low = run(host, store, "low", pre_model=LORA)
    patched = [m for m in mm.current_loaded_models if m.model.model.model_lowvram]
    assert patched, "the partial-load path was not taken"
    low_control = undressed_two_loads(host, store, "low_control")
    assert rel(low_control, full_control) < 1e-5
    assert rel(low, full) < 1e-5
    assert rel(full, run(host, store, "without_lora")) > 1e-2  # the LoRA matters for the dressed result
    monkeypatch.undo()
    host.reset_cache()


def test_rgba_png_through_load_image_composites_over_white_with_its_mask(host, caplog):
    """A cut-out PNG: stock Load Image leaves RGB black where alpha is 0 and puts 1 - alpha in MASK."""
    import os

    import numpy as np
    from PIL import Image

    rgba = np.zeros((128, 96, 4), dtype=np.uint8)  # encoded at 48x64: half size
    rgba[16:112, 16:80] = (200, 30, 30, 255)  # an opaque red garment on a fully transparent (black RGB) background
    rgba[16:112, 48:80, 3] = 128  # its right half half-transparent
    name = "adtest_cutout.png"
    Image.fromarray(rgba, "RGBA").save(os.path.join(host.folder_paths.get_input_directory(), name))
    image, mask = host.nodes.NODE_CLASS_MAPPINGS["LoadImage"]().load_image(name)
    assert float(image[0, 0, 0].max()) == 0.0 and float(mask[0, 0, 0]) == 1.0  # what the node receives today

    with caplog.at_level(logging.WARNING):
        _, black = encode_node(host, image_1=image)
    assert "the border of image_1 is mostly black; if it is a cut-out with transparency, connect Load Image's " \
           "MASK output to mask_1" in caplog.text
    assert float(black[0, 0, 0].max()) == 0.0

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        _, pixels = encode_node(host, image_1=image, mask_1=mask)
    assert "mostly black" not in caplog.text
    assert pixels.shape == (1, 64, 48, 3)
    assert torch.equal(pixels[0, :6], torch.ones(6, 48, 3))  # transparent border: white, not black
    assert torch.allclose(pixels[0, 30, 12], torch.tensor([200 / 255, 30 / 255, 30 / 255]), atol=1e-6)  # opaque
    half = 128 / 255  # alpha; Load Image's mask is 1 - alpha, the composite is rgb * alpha + (1 - alpha)
    expect = torch.tensor([200, 30, 30]) / 255 * half + (1 - half)
    assert torch.allclose(pixels[0, 30, 30], expect, atol=1e-5)
    with pytest.raises(Exception, match=r"Encode Garments: mask_1: the mask batch has 2 masks for 1 image\(s\); "
                                         r"give one mask for all or one per image; connect the MASK of the Load "
                                         r"Image that loads image_1"):
        encode_node(host, image_1=image, mask_1=mask.repeat(2, 1, 1))
