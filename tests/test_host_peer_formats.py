"""Host: garment model files users have (MagicClothing, plain UNets, ComfyUI checkpoints) through Load GarmentsNet."""

from __future__ import annotations

import argparse

import pytest
import torch
from safetensors.torch import save_file

import graphs
from compare import rel
from node_specs import choices
from anydressing_core.formats import DIFFUSERS_ATTN1_ORDER
from anydressing_core.layers import path_from_key
from anydressing_core.native_format import write_native

pytestmark = pytest.mark.host



def diffusers_sd(seed=0):
    import adtest_tiny
    import comfy.utils

    sd = adtest_tiny.tiny_unet_state_dict(seed)
    inverse = {v: k for k, v in comfy.utils.unet_to_diffusers(adtest_tiny.tiny_unet_config(32)).items()}
    return sd, {inverse[k]: v for k, v in sd.items()}


def run(host, store, key, clip=False, extra_weights="none", **kw):
    p = graphs.dressing_prompt(capture_key=key, **kw)
    if "gnet" in p:
        p["gnet"]["inputs"]["extra_weights_name"] = extra_weights
    if clip and "encode" in p:
        p["clip"] = {"class_type": "ADTestStubCLIP", "inputs": {"seed": 0}}
        p["encode"]["inputs"]["clip"] = ["clip", 0]
    r = host.run(p)
    if not r["success"]:
        return r["errors"][0]["exception_message"].strip()
    return store[key]


def test_magicclothing_garment_unet_runs_in_concat_mode(host, store):
    _, dsd = diffusers_sd(5)
    save_file(dsd, str(host.anydressing_dir() / "magic_clothing_test.safetensors"))
    msg = run(host, store, "x", gnet_name="magic_clothing_test.safetensors")
    assert msg == ("[AnyDressing] Encode Garments: magic_clothing_test.safetensors runs its garment UNet with the "
                   "empty prompt's text embedding, as its authors did: connect your checkpoint's CLIP to the 'clip' "
                   "input")
    plain = run(host, store, "plain", patched=False)
    concat = run(host, store, "concat", clip=True, gnet_name="magic_clothing_test.safetensors", strength=1.0)
    off = run(host, store, "off", clip=True, gnet_name="magic_clothing_test.safetensors", strength=0.0)
    assert torch.equal(off, plain)
    assert rel(concat, plain) > 1e-2
    msg = run(host, store, "m", clip=True, gnet_name="magic_clothing_test.safetensors",
              masks=[(0, 0, 1, 1, 1.0), (0, 0, 1, 1, 1.0)])
    assert "garment masks and weights need Dressing-Attention weights" in msg


def choices_now(host) -> list:
    return choices(host.nodes.NODE_CLASS_MAPPINGS["AnyDressingLoadGarmentsNet"].INPUT_TYPES()["optional"][
        "extra_weights_name"])


def test_magicclothing_stable_extractor_plus_ip_layer(host, store):
    sd, dsd = diffusers_sd(0)
    save_file(dsd, str(host.anydressing_dir() / "garment_extractor.safetensors"))
    ip = {}
    for i, key in enumerate(DIFFUSERS_ATTN1_ORDER):
        path = path_from_key(key)
        ip[f"{2 * i}.to_k_ip.weight"] = sd[f"{path}.attn1.to_k.weight"].clone()
        ip[f"{2 * i}.to_v_ip.weight"] = sd[f"{path}.attn1.to_v.weight"].clone()
    torch.save(ip, host.anydressing_dir() / "ip_layer.pth")
    # reference: the same extractor, W' left to the paper's init (the MODEL's own W_k/W_v, equal to the ip layers)
    write_native(str(host.anydressing_dir() / "extractor_only.safetensors"), unet=dsd,
                 extra_metadata={"text_context": "1"})
    extra_choices = choices(host.nodes.NODE_CLASS_MAPPINGS["AnyDressingLoadGarmentsNet"].INPUT_TYPES()["optional"][
        "extra_weights_name"])
    assert extra_choices[0] == "none" and "ip_layer.pth" in extra_choices  # W_k'/W_v' only: offered
    assert not {"garment_extractor.safetensors", "extractor_only.safetensors"} & set(extra_choices)  # UNets: not
    write_native(str(host.anydressing_dir() / "dressing_only.safetensors"),
                 dressing={path_from_key(k): (ip[f"{2 * i}.to_k_ip.weight"], ip[f"{2 * i}.to_v_ip.weight"])
                           for i, k in enumerate(DIFFUSERS_ATTN1_ORDER)})
    assert "dressing_only.safetensors" in choices_now(host)
    stable = run(host, store, "stable", clip=True, gnet_name="garment_extractor.safetensors",
                 extra_weights="ip_layer.pth")
    ref = run(host, store, "ref", clip=True, gnet_name="extractor_only.safetensors")
    assert isinstance(stable, torch.Tensor), stable
    assert rel(stable, ref) < 1e-4


def test_comfyui_checkpoint_and_pickle_refusal(host, store):
    sd, _ = diffusers_sd(5)
    ckpt = {f"model.diffusion_model.{k}": v for k, v in sd.items()}
    ckpt["first_stage_model.decoder.conv_in.weight"] = torch.zeros(4, 4)
    save_file(ckpt, str(host.anydressing_dir() / "whole_checkpoint.safetensors"))
    write_native(str(host.anydressing_dir() / "ldm_unet.safetensors"), unet=sd)
    a = run(host, store, "a", gnet_name="whole_checkpoint.safetensors")
    b = run(host, store, "b", gnet_name="ldm_unet.safetensors")
    assert torch.equal(a, b)
    torch.save({"module": {"input_blocks.0.0.weight": torch.ones(1)}, "args": argparse.Namespace(x=1)},
               host.anydressing_dir() / "needs_code.pt")
    msg = run(host, store, "c", gnet_name="needs_code.pt")
    assert msg.startswith("[AnyDressing] Load GarmentsNet: needs_code.pt is a pickle that needs code to load, and "
                          "this pack never runs code from a model file.")
    assert "--trust-pickle-code" in msg


def test_joint_garment_guidance(host, store):
    def guided(key, scale, **kw):
        p = graphs.dressing_prompt(capture_key=key, **kw)
        p["guide"] = {"class_type": "AnyDressingGarmentGuidance", "inputs": {"model": ["apply", 0],
                                                                              "garment_scale": scale}}
        p["sampler"]["inputs"]["model"] = ["guide", 0]
        r = host.run(p)
        assert r["success"], r["errors"]
        return store[key]

    plain_cfg = run(host, store, "plain_cfg", cfg=5.0)
    same = guided("same", 5.0, cfg=5.0)
    assert rel(same, plain_cfg) < 1e-5  # garment scale == text scale is plain CFG of t against u
    joint = guided("joint", 2.5, cfg=5.0)
    assert rel(joint, plain_cfg) > 1e-3  # so the garment row g differs from u: it sees the garments
    cfg1 = guided("cfg1", 2.5, cfg=1.0)
    assert torch.equal(cfg1, run(host, store, "cfg1_plain", cfg=1.0))


def test_imagdressing_pickle_with_clip_vision_context(host, store):
    from test_core_peer_formats import random_resampler_weights

    sd, dsd = diffusers_sd(7)
    g = torch.Generator().manual_seed(3)
    module = {f"ref_unet.{k}": v for k, v in dsd.items()}
    module["unet.conv_in.weight"] = torch.zeros(1)  # loaded into nothing at inference, as upstream
    module.update({f"proj.{k}": v for k, v in random_resampler_weights(g, dim=32, embedding=20, output=768,
                                                                       queries=16, depth=2, inner=64).items()})
    for i, key in enumerate(DIFFUSERS_ATTN1_ORDER):
        c = sd[f"{path_from_key(key)}.attn1.to_k.weight"].shape[0]
        module[f"adapter_modules.{2 * i}.to_k_ref.weight"] = torch.randn(c, c, generator=g) / c ** 0.5
        module[f"adapter_modules.{2 * i}.to_v_ref.weight"] = torch.randn(c, c, generator=g) / c ** 0.5
    torch.save({"module": module}, host.anydressing_dir() / "IMAGDressing-v1_test.pt")

    def imag(key, vision=True, **kw):
        p = graphs.dressing_prompt(capture_key=key, gnet_name="IMAGDressing-v1_test.pt", **kw)
        if vision:
            p["vision"] = {"class_type": "ADTestStubCLIPVision", "inputs": {"width": 20}}
            p["encode"]["inputs"]["clip_vision"] = ["vision", 0]
        r = host.run(p)
        return store[key] if r["success"] else r["errors"][0]["exception_message"].strip()

    msg = imag("none", vision=False)
    assert msg.startswith("[AnyDressing] Encode Garments: IMAGDressing-v1_test.pt builds GarmentsNet's context from "
                          "CLIP ViT-H image features")
    plain = run(host, store, "plain", patched=False)
    dressed = imag("imag", strength=1.0)
    assert rel(dressed, plain) > 1e-2
    assert torch.equal(imag("zero", strength=0.0), plain)
    other_garment = imag("other", strength=1.0, garments=((9, "upper"), (2, "lower")))
    assert rel(other_garment, dressed) > 1e-3


def test_dreamfit_separate_references_mid_and_output_only(host, store):
    import adtest_tiny

    sd = adtest_tiny.tiny_unet_state_dict(8)
    g = torch.Generator().manual_seed(4)
    ckpt = {f"target_unet.{k}": v for k, v in sd.items()}
    for key in DIFFUSERS_ATTN1_ORDER:
        if key[0] == "input":
            continue
        path = path_from_key(key)
        c = sd[f"{path}.attn1.to_k.weight"].shape[0]
        ckpt[f"target_unet.{path}.attn1.ref_to_k.weight"] = sd[f"{path}.attn1.to_k.weight"].clone()
        ckpt[f"target_unet.{path}.attn1.ref_to_v.weight"] = sd[f"{path}.attn1.to_v.weight"].clone()
        ckpt[f"target_unet.{path}.attn1.to_q_lora.down.weight"] = torch.randn(64, c, generator=g) * 0.1
        ckpt[f"target_unet.{path}.attn1.to_q_lora.up.weight"] = torch.randn(c, 64, generator=g) * 0.1
    torch.save({"state_dict": ckpt}, host.anydressing_dir() / "sd15_i2i_test.ckpt")

    def dream(key, uncond="auto", **kw):
        p = graphs.dressing_prompt(capture_key=key, gnet_name="sd15_i2i_test.ckpt", **kw)
        p["clip"] = {"class_type": "ADTestStubCLIP", "inputs": {"seed": 0}}
        p["encode"]["inputs"]["clip"] = ["clip", 0]
        p["apply"]["inputs"]["apply_to_uncond"] = uncond
        p["cap"] = {"class_type": "ADTestCaptureModel", "inputs": {"key": key + "_model", "model": ["apply", 0]}}
        r = host.run(p)
        assert r["success"], r["errors"]
        return store[key]

    plain = run(host, store, "plain", patched=False)
    auto = dream("auto", strength=1.0)
    (branch,) = host.pack_module("nodes.glue").garment_term(store["auto_model"]).branches
    assert sorted(branch.layers) == sorted([("middle", 0, 0)] + [("output", i, 0) for i in range(3, 12)])
    assert branch.mode == "separate" and branch.include_uncond  # DreamFit: both CFG halves see the garments
    no_uncond = dream("no", uncond="no", strength=1.0)
    assert rel(auto, plain) > 1e-2 and rel(auto, no_uncond) > 1e-3


def _family_files(host, family):
    """Write a tiny file (or pair) in the exact key layout of one family; returns (name, extra, expected)."""
    import adtest_tiny
    from test_core_peer_formats import random_resampler_weights

    d = host.anydressing_dir()
    sd, dsd = diffusers_sd(11)
    g = torch.Generator().manual_seed(12)
    ip = {}
    for i, key in enumerate(DIFFUSERS_ATTN1_ORDER):
        c = sd[f"{path_from_key(key)}.attn1.to_k.weight"].shape[0]
        ip[key] = (torch.randn(c, c, generator=g) / c ** 0.5, torch.randn(c, c, generator=g) / c ** 0.5)
    expected_unet, expected_w = sd, {}
    extra = None
    if family == "native":
        write_native(str(d / "fam_native.safetensors"), unet=sd,
                     dressing={path_from_key(k): v for k, v in ip.items()})
        name, expected_w = "fam_native.safetensors", ip
    elif family == "comfy_checkpoint":
        save_file({**{f"model.diffusion_model.{k}": v for k, v in sd.items()},
                   "first_stage_model.encoder.conv_in.weight": torch.zeros(1)}, str(d / "fam_ckpt.safetensors"))
        name = "fam_ckpt.safetensors"
    elif family == "magicclothing":
        save_file(dsd, str(d / "fam_magic.safetensors"))
        name = "fam_magic.safetensors"
    elif family == "magicclothing_stable":
        save_file(dsd, str(d / "fam_extractor.safetensors"))
        torch.save({f"{2 * i}.to_{p}_ip.weight": ip[key][j] for i, key in enumerate(DIFFUSERS_ATTN1_ORDER)
                    for j, p in enumerate("kv")}, d / "fam_ip_layer.pth")
        name, extra, expected_w = "fam_extractor.safetensors", "fam_ip_layer.pth", ip
    elif family == "imagdressing":
        module = {f"ref_unet.{k}": v for k, v in dsd.items()}
        module.update({f"proj.{k}": v for k, v in random_resampler_weights(g, dim=32, embedding=20, output=768,
                                                                           queries=16, depth=1, inner=64).items()})
        for i, key in enumerate(DIFFUSERS_ATTN1_ORDER):
            module[f"adapter_modules.{2 * i}.to_k_ref.weight"] = ip[key][0]
            module[f"adapter_modules.{2 * i}.to_v_ref.weight"] = ip[key][1]
        torch.save({"module": module}, d / "fam_imag.pt")
        name, expected_w = "fam_imag.pt", ip
    else:  # dreamfit
        ck = {f"target_unet.{k}": v for k, v in sd.items()}
        for key in DIFFUSERS_ATTN1_ORDER[6:]:
            ck[f"target_unet.{path_from_key(key)}.attn1.ref_to_k.weight"] = ip[key][0]
            ck[f"target_unet.{path_from_key(key)}.attn1.ref_to_v.weight"] = ip[key][1]
        torch.save({"state_dict": ck}, d / "fam_dreamfit.ckpt")
        name, expected_w = "fam_dreamfit.ckpt", {k: ip[k] for k in DIFFUSERS_ATTN1_ORDER[6:]}
    del adtest_tiny
    return name, extra, expected_unet, expected_w


FAMILIES = ["native", "comfy_checkpoint", "magicclothing", "magicclothing_stable", "imagdressing", "dreamfit"]


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_loads_weights_into_the_right_modules_and_converts(host, store, family):
    import adtest_tiny
    from anydressing_core.convert import convert

    gn = host.pack_module("nodes.load_garments_net")
    enc = host.pack_module("nodes.encode_garments")
    fixtures = host.nodes.NODE_CLASS_MAPPINGS
    clip = fixtures["ADTestStubCLIP"]().run(0)[0]
    vision = fixtures["ADTestStubCLIPVision"]().run(20)[0]
    base = adtest_tiny.tiny_model_patcher(0)
    name, extra, expected_unet, expected_w = _family_files(host, family)
    d = host.anydressing_dir()
    gnet = gn.load(name, str(d / name), base, str(d / extra) if extra else None)
    loaded = gnet.patcher.model.diffusion_model.state_dict()
    sample = sorted(expected_unet)[::37]
    for k in sample:  # tensor by tensor on a sample of keys
        assert torch.equal(loaded[k], expected_unet[k]), k
    for key, (wk, wv) in expected_w.items():
        assert torch.equal(gnet.dressing[key]["k"], wk) and torch.equal(gnet.dressing[key]["v"], wv), key
    g = torch.Generator().manual_seed(13)
    latents = torch.randn(2, 4, 8, 6, generator=g)
    pixels = torch.rand(2, 64, 48, 3, generator=g)
    feats = enc.encode(gnet, latents, ["upper", "lower"], clip, vision, pixels)
    converted = d / f"converted_{family}.safetensors"
    convert([str(d / name)], str(converted), dtype=None, extra=str(d / extra) if extra else None)
    gnet2 = gn.load(converted.name, str(converted), base)
    assert (gnet2.injection, gnet2.text_context, gnet2.uncond_default) == (
        gnet.injection, gnet.text_context, gnet.uncond_default)
    feats2 = enc.encode(gnet2, latents, ["upper", "lower"], clip, vision, pixels)
    assert list(feats2.layers) == list(feats.layers)
    for key in feats.layers:
        assert torch.equal(feats2.layers[key], feats.layers[key]), key
    # and the patched MODEL runs a sampling step with this family's features
    m = host.pack_module("nodes.apply_dressing_attention").apply(base, feats, 0.7, "", 0.0, 1.0, "auto", None)
    import comfy.sample
    import comfy.samplers

    latent = torch.zeros(1, 4, 8, 8)
    cond = [[torch.randn(1, 77, 768, generator=g), {}]]
    out = comfy.sample.sample(m, comfy.sample.prepare_noise(latent, 0), 1, 5.0, "euler", "normal", cond, cond,
                              latent, denoise=1.0, disable_pbar=True, seed=0)
    assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all()
