"""Host: garment model files users have (MagicClothing, plain UNets, ComfyUI checkpoints) through Load GarmentsNet."""

from __future__ import annotations

import argparse

import pytest
import torch
from safetensors.torch import save_file

import graphs
from anydressing_core.formats import DIFFUSERS_ATTN1_ORDER
from anydressing_core.layers import path_from_key
from anydressing_core.native_format import write_native

pytestmark = pytest.mark.host


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


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
