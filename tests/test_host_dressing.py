"""Host: the dressing nodes plus the stock KSampler through ComfyUI's real executor, on tiny SD1.5-architecture models."""

from __future__ import annotations

import pytest
import torch

import graphs
from compare import rel

pytestmark = pytest.mark.host


def run(host, store, key="out", **kw) -> torch.Tensor:
    r = host.run(graphs.dressing_prompt(capture_key=key, **kw))
    assert r["success"], r["errors"]
    return store[key]



def test_dressing_changes_output_and_strength_zero_is_exactly_unpatched(host, store):
    plain = run(host, store, "plain", patched=False)
    dressed = run(host, store, "dressed", strength=0.7)
    zero = run(host, store, "zero", strength=0.0)
    assert dressed.shape == plain.shape == (1, 4, 8, 8)
    assert rel(dressed, plain) > 1e-2
    assert torch.equal(zero, plain)


def test_duplicating_a_garment_leaves_the_output_unchanged(host, store):
    one = run(host, store, "one", garments=((1, "upper"),))
    two = run(host, store, "two", garments=((1, "upper"), (1, "upper")))
    assert rel(two, one) < 1e-4
    other = run(host, store, "other", garments=((1, "upper"), (3, "upper")))
    assert rel(other, one) > 1e-3  # a different second garment does change it


def test_input_model_is_not_mutated(host, store):
    p = graphs.dressing_prompt(capture_key="x")
    p["cap_base"] = {"class_type": "ADTestCaptureModel", "inputs": {"key": "base", "model": ["model", 0]}}
    p["cap_patched"] = {"class_type": "ADTestCaptureModel", "inputs": {"key": "patched", "model": ["apply", 0]}}
    assert host.run(p)["success"]
    base, patched = store["base"], store["patched"]
    assert base is not patched and base.model is patched.model  # a clone sharing the weights
    assert "patches" not in base.model_options.get("transformer_options", {})
    assert not base.wrappers
    to = patched.model_options["transformer_options"]
    assert "patches_replace" not in to  # no attn1 replacement: the slot stays free for other packs
    term = host.pack_module("nodes.glue").garment_term(patched)
    (branch,) = term.branches
    assert sorted(branch.layers) == sorted(term.blocks) == sorted(
        [("input", i, 0) for i in (1, 2, 4, 5, 7, 8)] + [("middle", 0, 0)] + [("output", i, 0) for i in range(3, 12)])
    assert to["patches"]["attn1_patch"] == [term.input_patch] and to["patches"]["middle_patch"] == [term.middle_patch]
    assert list(patched.wrappers) == ["outer_sample"] and "anydressing" in patched.wrappers["outer_sample"]
    # the run cache was dropped when sampling finished
    assert "anydressing_run_cache" not in patched.model_options["transformer_options"]


def test_seed_only_rerun_does_not_encode_again(host, store):
    run(host, store, "s0", seed=0)
    r = host.run(graphs.dressing_prompt(capture_key="s1", seed=1))
    assert r["success"]
    assert "encode" in r["cached"] and "encode" not in r["executed"]  # ComfyUI's own cache events
    assert not torch.equal(store["s1"], store["s0"])


def test_all_zero_masks_equal_unpatched_and_masked_out_garment_has_no_effect(host, store):
    plain = run(host, store, "plain", patched=False)
    zero = run(host, store, "zero", masks=[(0, 0, 0, 0, 1.0), (0, 0, 0, 0, 1.0)])
    assert torch.equal(zero, plain)
    a = run(host, store, "a", garments=((1, "upper"), (2, "lower")), masks=[(0, 0, 1, 1, 1.0), (0, 0, 0, 0, 1.0)])
    b = run(host, store, "b", garments=((1, "upper"), (7, "lower")), masks=[(0, 0, 1, 1, 1.0), (0, 0, 0, 0, 1.0)])
    assert torch.equal(a, b)
    assert rel(a, plain) > 1e-2
    half = run(host, store, "half", garments=((1, "upper"), (7, "lower")), masks=[(0, 0, 1, 0.5, 1.0), (0, 0.5, 1, 1, 1.0)])
    assert rel(half, b) > 1e-3


def test_two_apply_nodes_stack(host, store):
    def second(strength):
        return lambda model_ref: graphs.second_apply(model_ref, strength)

    single = run(host, store, "single")
    chained_off = run(host, store, "chained_off", extra_apply=second(0.0))
    chained = run(host, store, "chained", extra_apply=second(0.7))
    assert torch.equal(chained_off, single)
    assert rel(chained, single) > 1e-3


def test_another_packs_attn1_replacement_is_called_not_dropped(host, store):
    import adtest_tiny

    foreign = {"foreign": {"class_type": "ADTestForeignAttn1", "inputs": {"model": ["model", 0], "scale": 0.5}}}
    only_foreign = run(host, store, "only_foreign", patched=False, pre_model=foreign)
    calls = adtest_tiny.CALLS["foreign_attn1"]
    both_zero = run(host, store, "both_zero", pre_model=foreign, strength=0.0)
    assert adtest_tiny.CALLS["foreign_attn1"] > calls
    assert torch.equal(both_zero, only_foreign)
    both = run(host, store, "both", pre_model=foreign, strength=0.7)
    assert rel(both, only_foreign) > 1e-3


def test_cfg_one_batches_and_aspect_ratios(host, store):
    plain = run(host, store, "p", patched=False, cfg=1.0, batch=2, latent_w=48, latent_h=72)
    dressed = run(host, store, "d", cfg=1.0, batch=2, latent_w=48, latent_h=72,
                  garments=((1, "upper", 64, 190), (2, "dress", 240, 80)))
    assert dressed.shape == (2, 4, 9, 6)
    assert rel(dressed, plain) > 1e-2
    assert torch.isfinite(dressed).all()


def test_uncond_option_and_schedule_window(host, store):
    plain = run(host, store, "plain", patched=False)
    default = run(host, store, "default")
    with_uncond = run(host, store, "uncond", include_uncond=True)
    assert rel(with_uncond, default) > 1e-3
    never = run(host, store, "never", start=0.0, end=0.0)
    assert torch.equal(never, plain)
    late = run(host, store, "late", start=0.5, end=1.0)
    # only the last of two steps is dressed: it differs from plain, and much less than dressing both steps
    assert not torch.equal(late, plain)
    assert rel(late, plain) < rel(default, plain) / 10


def test_lora_on_the_model_reaches_dressing_attention(host, store):
    """training-free W_k'/W_v' are the MODEL's to_k/to_v as loaded for sampling: a LoRA patch must apply to them."""
    patched = {"lora": {"class_type": "ADTestAddLoRA",
                        "inputs": {"model": ["model", 0], "seed": 4, "strength": 1.0, "merge": False}}}
    merged = {"lora": {"class_type": "ADTestAddLoRA",
                       "inputs": {"model": ["model", 0], "seed": 4, "strength": 1.0, "merge": True}}}
    via_patch = run(host, store, "via_patch", pre_model=patched)
    via_merge = run(host, store, "via_merge", pre_model=merged)
    plain = run(host, store, "plain")
    assert rel(via_patch, plain) > 1e-2
    assert rel(via_patch, via_merge) < 1e-4


def test_controlnet_keeps_working_with_dressing(host, store):
    def with_controlnet(p):
        p["cn"] = {"class_type": "ADTestTinyControlNet", "inputs": {"seed": 3}}
        p["hint"] = {"class_type": "ADTestGarmentImage", "inputs": {"seed": 21, "width": 64, "height": 64}}
        p["cn_apply"] = {"class_type": "ControlNetApplyAdvanced",
                         "inputs": {"positive": ["pos", 0], "negative": ["neg", 0], "control_net": ["cn", 0],
                                    "image": ["hint", 0], "strength": 1.0, "start_percent": 0.0,
                                    "end_percent": 1.0}}
        p["sampler"]["inputs"]["positive"] = ["cn_apply", 0]
        p["sampler"]["inputs"]["negative"] = ["cn_apply", 1]
        return p

    def run_p(key, **kw):
        r = host.run(with_controlnet(graphs.dressing_prompt(capture_key=key, **kw)))
        assert r["success"], r["errors"]
        return store[key]

    cn_plain = run_p("cn_plain", patched=False)
    cn_zero = run_p("cn_zero", strength=0.0)
    cn_dressed = run_p("cn_dressed")
    dressed = run(host, store, "dressed")
    assert torch.equal(cn_zero, cn_plain)
    assert rel(cn_dressed, cn_plain) > 1e-2  # dressing still acts with a ControlNet
    assert rel(cn_dressed, dressed) > 1e-2  # and the ControlNet still acts with dressing


def test_garment_projections_once_per_sampling_run_and_freed_after(host, store, monkeypatch):
    import gc
    import weakref

    branch_mod = host.pack_module("anydressing_core.branch")
    calls, projected = [], []
    original_project = branch_mod.DressingLayer.project

    def counting_project(self, device, dtype):
        calls.append(1)
        out = original_project(self, device, dtype)
        projected.extend(weakref.ref(t) for t in out)
        return out

    monkeypatch.setattr(branch_mod.DressingLayer, "project", counting_project)
    run(host, store, "three_steps", steps=3)
    assert len(calls) == 16  # one K'/V' projection per layer for 3 steps x (cond, uncond)
    gc.collect()
    assert len(projected) == 32 and all(r() is None for r in projected)  # freed when sampling ended
    run(host, store, "again", steps=3, seed=1)
    assert len(calls) == 32  # a new run projects again (weights may have changed)


def test_training_free_on_an_sdxl_architecture_model(host):
    """The layers are found by walking the model: a (tiny) SDXL-architecture UNet, with two transformer blocks per
    layer and a class-conditioning vector, encodes and patches in training-free mode."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    import adtest_tiny

    cfg = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
           "legacy": False, "num_classes": "sequential", "adm_in_channels": 64, "in_channels": 4,
           "model_channels": 32, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 2, 2],
           "channel_mult": [1, 2, 4], "transformer_depth_middle": 2, "use_linear_in_transformer": True,
           "context_dim": 64, "num_head_channels": 16, "transformer_depth_output": [0, 0, 0, 2, 2, 2, 2, 2, 2],
           "use_temporal_attention": False, "use_temporal_resblock": False}
    model_config = comfy.supported_models.SDXL(cfg)
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({}, "")
    adtest_tiny.randomize(model.diffusion_model, 0)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                               offload_device=mm.unet_offload_device())
    gn = host.pack_module("nodes.load_garments_net")
    enc = host.pack_module("nodes.encode_garments")
    apply = host.pack_module("nodes.apply_dressing_attention")
    feats = enc.encode(gn.load("training-free", None, patcher), torch.randn(2, 4, 8, 8), ["upper", "lower"])
    assert len(feats.layers) == 22 and ("input", 4, 1) in feats.layers  # 2 blocks in each of 11 transformers
    m = apply.apply(patcher, feats, 0.7, "", 0.0, 1.0, "auto", None)
    assert len(host.pack_module("nodes.glue").garment_term(m).branches[0].layers) == 22
