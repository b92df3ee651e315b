"""Host-free: detection of the garment model files users have, safe pickle loading, the converter, concat mode."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from anydressing_core.attention import sdpa_attention
from anydressing_core.branch import DressingAttentionReplace, DressingBranch, DressingLayer
from anydressing_core.formats import DIFFUSERS_ATTN1_ORDER, contents_from, detect, load_contents, read_tensors
from anydressing_core.native_format import FormatError, read_native

REPO = Path(__file__).resolve().parent.parent


def test_detection_from_keys_not_names():
    z = torch.zeros(1)
    assert detect({"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight": z}, {}) == "diffusers_unet"
    assert detect({"input_blocks.0.0.weight": z}, {}) == "ldm_unet"
    assert detect({"model.diffusion_model.input_blocks.0.0.weight": z, "first_stage_model.x": z}, {}) == "ldm_unet"
    assert detect({"0.to_k_ip.weight": z, "0.to_v_ip.weight": z}, {}) == "ip_layer"
    assert detect({"ref_unet.conv_in.weight": z, "adapter_modules.0.to_k_ref.weight": z}, {}) == "imagdressing"
    assert detect({"target_unet.input_blocks.0.0.weight": z}, {}) == "dreamfit"
    assert detect({"x": z}, {"anydressing_format": "1"}) == "native"
    with pytest.raises(FormatError, match=r"x.pt: unknown layout; first keys: foo.bar \(1 keys\); known layouts"):
        contents_from({"foo.bar": z}, {}, "x.pt")
    with pytest.raises(FormatError, match="is a IMAGDressing-v1 checkpoint; this version of the pack recognises it"):
        contents_from({"ref_unet.conv_in.weight": z, "adapter_modules.0.to_k_ref.weight": z}, {}, "i.pt")


def test_comfyui_checkpoint_keeps_only_the_unet():
    z = torch.ones(2)
    c = contents_from({"model.diffusion_model.input_blocks.0.0.weight": z, "first_stage_model.decoder.x": z,
                       "cond_stage_model.transformer.y": z}, {}, "ckpt.safetensors")
    assert list(c.unet) == ["input_blocks.0.0.weight"] and c.unet_naming == "ldm"
    assert c.metadata["injection"] == "dressing"


def test_ip_layer_indices_follow_diffusers_processor_order(tmp_path):
    tensors = {}
    for i, key in enumerate(DIFFUSERS_ATTN1_ORDER):
        tensors[f"{2 * i}.to_k_ip.weight"] = torch.full((4, 4), float(i))
        tensors[f"{2 * i}.to_v_ip.weight"] = torch.full((4, 4), -float(i))
    torch.save(tensors, tmp_path / "ip_layer.pth")
    c = load_contents(str(tmp_path / "ip_layer.pth"))
    assert c.dressing[("input", 1, 0)]["k"][0, 0] == 0 and c.dressing[("middle", 0, 0)]["k"][0, 0] == 15
    assert c.dressing[("output", 3, 0)]["v"][0, 0] == -6  # up_blocks.1.attentions.0 comes before mid
    with pytest.raises(FormatError, match="not an SD1.5 attn1 processor index"):
        contents_from({"3.to_k_ip.weight": torch.zeros(4, 4), "3.to_v_ip.weight": torch.zeros(4, 4)}, {}, "ip.pth")


def test_pickles_are_weights_only_and_code_is_refused(tmp_path):
    torch.save({"state_dict": {"input_blocks.0.0.weight": torch.ones(3)}}, tmp_path / "ok.ckpt")
    tensors, _ = read_tensors(str(tmp_path / "ok.ckpt"))
    assert list(tensors) == ["input_blocks.0.0.weight"]
    torch.save({"module": {"input_blocks.0.0.weight": torch.ones(3)}, "args": argparse.Namespace(lr=1)},
               tmp_path / "code.pt")
    with pytest.raises(FormatError, match=r"code.pt is a pickle that needs code to load, and this pack never runs "
                                          r"code from a model file. If you trust its source, convert it once"):
        read_tensors(str(tmp_path / "code.pt"))
    (tmp_path / "junk.pth").write_bytes(b"not a pickle at all")
    with pytest.raises(FormatError, match="junk.pth is not a readable checkpoint"):
        read_tensors(str(tmp_path / "junk.pth"))


def test_converter_writes_native_fp16(tmp_path):
    g = torch.Generator().manual_seed(0)
    unet = {"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight": torch.randn(8, 8, generator=g)}
    save_file(unet, str(tmp_path / "garment_extractor.safetensors"))
    ip = {f"{2 * i}.to_{p}_ip.weight": torch.randn(8, 8, generator=g) for i in range(16) for p in "kv"}
    torch.save({"module": ip, "args": argparse.Namespace(x=1)}, tmp_path / "ip_layer.pth")
    out = tmp_path / "stable.safetensors"
    cmd = [sys.executable, "-m", "anydressing_core.convert", str(tmp_path / "garment_extractor.safetensors"),
           "--extra", str(tmp_path / "ip_layer.pth"), "-o", str(out)]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2 and "needs code to load" in r.stderr  # the pickle holds an object: refused
    r = subprocess.run(cmd + ["--trust-pickle-code"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "1 UNet tensors, 0 LoRA slot(s), 16 Dressing-Attention layer(s), injection dressing" in r.stdout
    c = read_native(str(out))
    assert c.unet_naming == "diffusers" and c.metadata["injection"] == "dressing"
    assert all(t.dtype == torch.float16 for t in c.unet.values())
    torch.testing.assert_close(c.dressing[("middle", 0, 0)]["k"].float(), ip["30.to_k_ip.weight"], atol=1e-2, rtol=1e-2)


def test_concat_mode_joins_garment_tokens_and_gives_uncond_rows_zero_tokens():
    """MagicClothing: softmax over [latent tokens; garment tokens] with the block's own projections."""
    g = torch.Generator().manual_seed(4)
    c, heads, lq, lg = 16, 2, 6, 5
    q, k, v = (torch.randn(4, lq, c, generator=g) for _ in range(3))
    feats = torch.randn(1, lg, c, generator=g)
    wk, wv = torch.randn(c, c, generator=g), torch.randn(c, c, generator=g)
    key = ("input", 1, 0)
    layer = DressingLayer(features=feats, segments=[(0, lg)], key_proj=wk, value_proj=wv)
    branch = DressingBranch({key: layer}, strength=1.0, mode="concat", attention=sdpa_attention)
    rep = DressingAttentionReplace(key, lambda q_, k_, v_, e: sdpa_attention(q_, k_, v_, e["n_heads"]),
                                   branches=[branch])
    out = rep(q, k, v, {"n_heads": heads, "cond_or_uncond": [1, 0]})
    kf, vf = feats @ wk.t(), feats @ wv.t()
    cond = sdpa_attention(q[2:], torch.cat([k[2:], kf.expand(2, -1, -1)], 1), torch.cat([v[2:], vf.expand(2, -1, -1)], 1),
                          heads)
    uncond = sdpa_attention(q[:2], torch.cat([k[:2], torch.zeros(2, lg, c)], 1),
                            torch.cat([v[:2], torch.zeros(2, lg, c)], 1), heads)
    torch.testing.assert_close(out[2:], cond, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:2], uncond, atol=1e-5, rtol=1e-5)
    off = DressingAttentionReplace(key, rep.self_attention, branches=[
        DressingBranch({key: layer}, strength=0.0, mode="concat")])(q, k, v, {"n_heads": heads})
    assert torch.equal(off, sdpa_attention(q, k, v, heads))
    with pytest.raises(ValueError, match="garment masks and weights need Dressing-Attention weights"):
        DressingBranch({key: layer}, mode="concat", masks=torch.ones(1, 4, 4))
