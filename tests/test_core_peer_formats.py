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
from anydressing_core.branch import DressingBranch, DressingLayer
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
    with pytest.raises(FormatError, match=r"i.pt: IMAGDressing-v1 file without its proj.\* resampler weights"):
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
    assert ("1 UNet tensors, 0 LoRA slot(s), 16 Dressing-Attention layer(s); garments enter the MODEL as additive "
            "Dressing-Attention (eq. 6)") in r.stdout
    c = read_native(str(out))
    assert c.unet_naming == "diffusers" and c.metadata["injection"] == "dressing"
    assert all(t.dtype == torch.float16 for t in c.unet.values())
    torch.testing.assert_close(c.dressing[("middle", 0, 0)]["k"].float(), ip["30.to_k_ip.weight"], atol=1e-2, rtol=1e-2)


@torch.no_grad()
def test_concat_mode_joins_garment_tokens_and_gives_uncond_rows_zero_tokens():
    """MagicClothing: softmax over [latent tokens; garment tokens] with the block's own projections; the garment
    tokens join the context and value the block projects (its attn1_patch), the unconditional rows get zeros."""
    from block_sim import Block, run_block

    from anydressing_core import hooks

    g = torch.Generator().manual_seed(4)
    c, heads, lq, lg = 16, 2, 6, 5
    block = Block(c, 4)
    x = torch.randn(4, lq, c, generator=g)
    feats = torch.randn(1, lg, c, generator=g)
    key = ("input", 1, 0)
    a = block.attn1
    layer = DressingLayer(features=feats, segments=[(0, lg)], key_proj=a.to_k, value_proj=a.to_v)
    to = {"cond_or_uncond": [1, 0]}
    hooks.install(to, DressingBranch({key: layer}, strength=0.8, mode="concat", attention=sdpa_attention), {key: block})
    out = run_block(block, x, key, to, heads)
    n = block.norm1(x)
    q, k, v = a.to_q(n), a.to_k(n), a.to_v(n)
    kf, vf = a.to_k(feats).expand(2, -1, -1), 0.8 * a.to_v(feats).expand(2, -1, -1)
    cond = sdpa_attention(q[2:], torch.cat([k[2:], kf], 1), torch.cat([v[2:], vf], 1), heads)
    uncond = sdpa_attention(q[:2], torch.cat([k[:2], torch.zeros(2, lg, c)], 1),
                            torch.cat([v[:2], torch.zeros(2, lg, c)], 1), heads)
    torch.testing.assert_close(out[2:], x[2:] + a.to_out(cond), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:2], x[:2] + a.to_out(uncond), atol=1e-5, rtol=1e-5)
    # an attn1 replacement that returns the values of every key (PAG's perturbed pass): the latent tokens' rows
    assert torch.equal(run_block(block, x, key, to, heads, lambda q_, k_, v_, e: v_),
                       x + a.to_out(v))
    off = {"cond_or_uncond": [1, 0]}
    hooks.install(off, DressingBranch({key: layer}, strength=0.0, mode="concat"), {key: block})
    assert torch.equal(run_block(block, x, key, off, heads), run_block(block, x, key, {}, heads))
    with pytest.raises(ValueError, match="garment masks and weights need Dressing-Attention weights"):
        DressingBranch({key: layer}, mode="concat", masks=torch.ones(1, 4, 4))


def random_resampler_weights(g, dim=24, embedding=20, output=16, queries=4, depth=2, inner=32, ff=48):
    sd = {"latents": torch.randn(1, queries, dim, generator=g), "proj_in.weight": torch.randn(dim, embedding, generator=g),
          "proj_in.bias": torch.randn(dim, generator=g), "proj_out.weight": torch.randn(output, dim, generator=g),
          "proj_out.bias": torch.randn(output, generator=g), "norm_out.weight": 1 + 0.1 * torch.randn(output, generator=g),
          "norm_out.bias": 0.1 * torch.randn(output, generator=g)}
    for i in range(depth):
        a = f"layers.{i}.0."
        for n in ("norm1", "norm2"):
            sd[a + n + ".weight"] = 1 + 0.1 * torch.randn(dim, generator=g)
            sd[a + n + ".bias"] = 0.1 * torch.randn(dim, generator=g)
        sd[a + "to_q.weight"] = torch.randn(inner, dim, generator=g) / dim ** 0.5
        sd[a + "to_kv.weight"] = torch.randn(2 * inner, dim, generator=g) / dim ** 0.5
        sd[a + "to_out.weight"] = torch.randn(dim, inner, generator=g) / inner ** 0.5
        f = f"layers.{i}.1."
        sd[f + "0.weight"] = 1 + 0.1 * torch.randn(dim, generator=g)
        sd[f + "0.bias"] = 0.1 * torch.randn(dim, generator=g)
        sd[f + "1.weight"] = torch.randn(ff, dim, generator=g) / dim ** 0.5
        sd[f + "3.weight"] = torch.randn(dim, ff, generator=g) / ff ** 0.5
    return sd


def reference_resampler(sd, x, heads):
    """IP-Adapter-Plus resampler written out with explicit softmax (q and k each scaled by d^-1/4)."""
    ln = torch.nn.functional.layer_norm
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("layers."))
    lat = sd["latents"].expand(x.shape[0], -1, -1)
    x = x @ sd["proj_in.weight"].t() + sd["proj_in.bias"]
    dim = lat.shape[-1]
    for i in range(depth):
        a, f = f"layers.{i}.0.", f"layers.{i}.1."
        xn = ln(x, (dim,), sd[a + "norm1.weight"], sd[a + "norm1.bias"])
        ln_lat = ln(lat, (dim,), sd[a + "norm2.weight"], sd[a + "norm2.bias"])
        q = ln_lat @ sd[a + "to_q.weight"].t()
        k, v = (torch.cat([xn, ln_lat], 1) @ sd[a + "to_kv.weight"].t()).chunk(2, -1)
        b, n, inner = q.shape
        d = inner // heads
        qh, kh, vh = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
        w = torch.softmax((qh * d ** -0.25) @ (kh * d ** -0.25).transpose(-1, -2), dim=-1)
        lat = (w @ vh).transpose(1, 2).reshape(b, n, inner) @ sd[a + "to_out.weight"].t() + lat
        h = ln(lat, (dim,), sd[f + "0.weight"], sd[f + "0.bias"]) @ sd[f + "1.weight"].t()
        lat = torch.nn.functional.gelu(h) @ sd[f + "3.weight"].t() + lat
    out = lat @ sd["proj_out.weight"].t() + sd["proj_out.bias"]
    return ln(out, (out.shape[-1],), sd["norm_out.weight"], sd["norm_out.bias"])


def test_resampler_matches_the_written_out_reference():
    from anydressing_core.resampler import resampler_from_weights

    g = torch.Generator().manual_seed(0)
    sd = random_resampler_weights(g, inner=128)  # 2 heads of 64
    model = resampler_from_weights(sd)
    x = torch.randn(3, 7, 20, generator=g)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (3, 4, 16)
    torch.testing.assert_close(out, reference_resampler(sd, x, heads=2), atol=1e-4, rtol=1e-4)


def test_dreamfit_lora_is_merged_and_ref_layers_mapped():
    from anydressing_core.formats import dreamfit_contents

    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, 8, generator=g)
    conv = torch.randn(8, 4, 3, 3, generator=g)
    down, up = torch.randn(2, 8, generator=g), torch.randn(8, 2, generator=g)
    cdown, cup = torch.randn(2, 4, 3, 3, generator=g), torch.randn(8, 2, 1, 1, generator=g)
    path = "output_blocks.3.1.transformer_blocks.0"
    t = {f"target_unet.{path}.attn1.to_q.weight": w, f"target_unet.{path}.attn1.to_q_lora.down.weight": down,
         f"target_unet.{path}.attn1.to_q_lora.up.weight": up, "target_unet.input_blocks.0.0.weight": conv,
         "target_unet.input_blocks.0.0.lora_layer.down.weight": cdown,
         "target_unet.input_blocks.0.0.lora_layer.up.weight": cup,
         f"target_unet.{path}.attn1.ref_to_k.weight": w * 2, f"target_unet.{path}.attn1.ref_to_v.weight": w * 3}
    c = dreamfit_contents(t, "sd15_i2i.ckpt")
    torch.testing.assert_close(c.unet[f"{path}.attn1.to_q.weight"], w + 0.125 * up @ down)
    ref_conv = conv + 0.125 * torch.nn.functional.conv2d(cdown.permute(1, 0, 2, 3), cup).permute(1, 0, 2, 3)
    torch.testing.assert_close(c.unet["input_blocks.0.0.weight"], ref_conv, atol=1e-5, rtol=1e-5)
    assert torch.equal(c.dressing[("output", 3, 0)]["k"], w * 2)
    assert c.metadata["injection"] == "separate" and c.metadata["uncond"] == "1"
    assert not any("lora" in k or "ref_to" in k for k in c.unet)


def test_separate_mode_sums_per_garment_attention():
    from anydressing_core.attention import garment_attention, sdpa_attention

    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 6, 16, generator=g)
    keys, values = torch.randn(1, 9, 16, generator=g), torch.randn(1, 9, 16, generator=g)
    segs = [(0, 4), (4, 9)]
    masks = torch.rand(2, 6, generator=g)
    out = garment_attention(q, keys, values, 4, segs, weights=[1.0, 0.5], masks=masks, joint=False)
    ref = sum(w * masks[k].view(1, 6, 1) * sdpa_attention(q, keys[:, a:e].expand(2, -1, -1),
                                                          values[:, a:e].expand(2, -1, -1), 4)
              for k, ((a, e), w) in enumerate(zip(segs, [1.0, 0.5])))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
