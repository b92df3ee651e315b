"""Host: Load GarmentsNet with AnyDressing-native files, the GFE LoRA per slot, W_k'/W_v', and the node errors."""

from __future__ import annotations

import logging

import pytest
import torch

import graphs
from compare import rel
from anydressing_core.native_format import write_native

pytestmark = pytest.mark.host

LAYER_PATHS = ([f"input_blocks.{i}.1.transformer_blocks.0" for i in (1, 2, 4, 5, 7, 8)] +
               ["middle_block.1.transformer_blocks.0"] +
               [f"output_blocks.{i}.1.transformer_blocks.0" for i in range(3, 12)])


def tiny_sd(seed=5, channels=32):
    import adtest_tiny

    return adtest_tiny.tiny_unet_state_dict(seed, channels)


def random_loras(sd, seed, rank=4, alpha=2.0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for path in LAYER_PATHS:
        c = sd[f"{path}.attn1.to_q.weight"].shape[0]
        out[path] = {p: (0.3 * torch.randn(rank, c, generator=g), 0.3 * torch.randn(c, rank, generator=g), alpha)
                     for p in "qkv"}
    return out


def write(host, name, **kw):
    path = host.anydressing_dir() / name
    write_native(str(path), **kw)
    return path


def run(host, store, key, **kw):
    r = host.run(graphs.dressing_prompt(capture_key=key, **kw))
    assert r["success"], r["errors"]
    return store[key]


def run_error(host, **kw) -> str:
    r = host.run(graphs.dressing_prompt(**kw))
    assert not r["success"]
    # the type ComfyUI shows next to the message: plain, not a module path built from the install folder
    assert r["errors"][0]["exception_type"] == "anydressing.NodeError", r["errors"][0]["exception_type"]
    return r["errors"][0]["exception_message"].strip()



def encode_with(host, name, slots, base=None, seeds=None):
    """Load a file through the pack's loader and run the pack's encode on fixed garment latents."""
    gn = host.pack_module("nodes.load_garments_net")
    enc = host.pack_module("nodes.encode_garments")
    path = str(host.anydressing_dir() / name) if name != "training-free" else None
    gnet = gn.load(name, path, base)
    g = torch.Generator().manual_seed(11)
    latents = torch.randn(len(slots), 4, 8, 6, generator=g)
    return enc.encode(gnet, latents, list(slots))


def test_native_file_ldm_and_diffusers_naming_give_the_same_result(host, store):
    import comfy.utils
    import adtest_tiny

    sd = tiny_sd(5)
    write(host, "gn_ldm.safetensors", unet=sd)
    mapping = comfy.utils.unet_to_diffusers(adtest_tiny.tiny_unet_config(32))
    inverse = {v: k for k, v in mapping.items()}
    diffusers_sd = {inverse[k]: v for k, v in sd.items()}
    assert len(diffusers_sd) == len(sd) and "conv_in.weight" in diffusers_sd
    write(host, "gn_diffusers.safetensors", unet=diffusers_sd)
    free = run(host, store, "free")
    ldm = run(host, store, "ldm", gnet_name="gn_ldm.safetensors")
    diff = run(host, store, "diff", gnet_name="gn_diffusers.safetensors")
    assert rel(ldm, free) > 1e-3  # another GarmentsNet gives other features
    assert torch.equal(ldm, diff)


def test_slot_lora_equals_merged_weights_and_missing_slot_warns(host, caplog):
    sd = tiny_sd(5)
    loras = random_loras(sd, 1)
    write(host, "gn_lora.safetensors", unet=sd, loras={"upper": loras})
    merged = dict(sd)
    for path, projs in loras.items():
        for p, (down, up, alpha) in projs.items():
            k = f"{path}.attn1.to_{p}.weight"
            merged[k] = sd[k] + (alpha / down.shape[0]) * up @ down
    write(host, "gn_merged.safetensors", unet=merged)
    write(host, "gn_plain.safetensors", unet=sd)

    with caplog.at_level(logging.WARNING):
        with_lora = encode_with(host, "gn_lora.safetensors", ["upper", "lower"])
    assert "has no GFE LoRA for slot 'lower'" in caplog.text
    merged_f = encode_with(host, "gn_merged.safetensors", ["upper", "upper"])
    plain_f = encode_with(host, "gn_plain.safetensors", ["lower", "lower"])
    assert with_lora.count == 2 and len(with_lora.layers) == 16
    for key, t in with_lora.layers.items():
        s0, s1 = with_lora.segments[key]
        ref_upper = merged_f.layers[key][:, s0[0]:s0[1]]
        ref_lower = plain_f.layers[key][:, s1[0]:s1[1]]
        assert rel(t[:, s0[0]:s0[1]], ref_upper) < 1e-4, key  # row 0: through the 'upper' LoRA
        assert rel(t[:, s1[0]:s1[1]], ref_lower) < 1e-4, key  # row 1: base weights
    # the LoRA really changes the features after the first layer (its input is the conv stem, not attention)
    last = ("output", 11, 0)
    assert rel(with_lora.layers[last][:, :48], plain_f.layers[last][:, :48]) > 1e-3


def test_features_are_the_norm1_inputs_of_sixteen_layers(host):
    import adtest_tiny

    base = adtest_tiny.tiny_model_patcher(0)
    f = encode_with(host, "training-free", ["upper", "lower", "hat"], base=base)
    assert f.count == 3 and f.slots == ["upper", "lower", "hat"]
    widths = {k: t.shape[-1] for k, t in f.layers.items()}
    assert widths[("input", 1, 0)] == 32 and widths[("input", 4, 0)] == 64 and widths[("middle", 0, 0)] == 128
    # latent 8 x 6 -> 48 tokens per garment at the first level, 1 x 1 = 1 at the middle block
    assert f.segments[("input", 1, 0)] == [(0, 48), (48, 96), (96, 144)]
    assert f.segments[("middle", 0, 0)] == [(0, 1), (1, 2), (2, 3)]
    # a LayerNorm output: zero mean, unit variance over channels (up to the affine parameters)
    ln = base.model.diffusion_model.input_blocks[1][1].transformer_blocks[0].norm1
    x = f.layers[("input", 1, 0)]
    normalized = (x - ln.bias) / ln.weight
    assert normalized.mean(-1).abs().max() < 1e-4


def test_dressing_weights_from_file_are_used(host, store):
    import adtest_tiny

    model_sd = adtest_tiny.tiny_unet_state_dict(0)
    copies = {p: (model_sd[f"{p}.attn1.to_k.weight"].clone(), model_sd[f"{p}.attn1.to_v.weight"].clone())
              for p in LAYER_PATHS}
    write(host, "da_copy.safetensors", dressing=copies)
    g = torch.Generator().manual_seed(3)
    rnd = {p: (torch.randn(wk.shape, generator=g) / wk.shape[0] ** 0.5, torch.randn(wv.shape, generator=g) / wv.shape[0] ** 0.5)
           for p, (wk, wv) in copies.items()}
    write(host, "da_random.safetensors", dressing=rnd)
    free = run(host, store, "free")
    copy_run = run(host, store, "copy", gnet_name="da_copy.safetensors")
    rnd_run = run(host, store, "rnd", gnet_name="da_random.safetensors")
    assert rel(copy_run, free) < 1e-4  # W' copied from W_k/W_v is the paper's init == training-free
    assert rel(rnd_run, free) > 1e-3


def test_partial_unet_needs_the_model(host, store):
    sd = tiny_sd(6)
    partial = {k: v for k, v in sd.items() if k.startswith("output_blocks")}
    write(host, "partial.safetensors", unet=partial)
    assert run(host, store, "partial", gnet_name="partial.safetensors").shape == (1, 4, 8, 8)
    gn = host.pack_module("nodes.load_garments_net")
    with pytest.raises(Exception, match=r"partial.safetensors holds a partial GarmentsNet \(\d+ UNet tensors, without "
                                         r"input_blocks.0.0.weight\); connect the base MODEL to the 'model' input"):
        gn.load("partial.safetensors", str(host.anydressing_dir() / "partial.safetensors"), None)


def test_load_errors_name_the_node_input_and_fix(host):
    cls = host.nodes.NODE_CLASS_MAPPINGS["AnyDressingLoadGarmentsNet"]
    with pytest.raises(Exception, match=r"\[AnyDressing\] Load GarmentsNet: 'training-free' uses the base MODEL's "
                                         r"own UNet as GarmentsNet: connect"):
        cls.execute("training-free")
    expected = host.anydressing_dir() / "gone.safetensors"
    with pytest.raises(Exception, match=rf"GarmentsNet file 'gone.safetensors' not found \(expected at {expected}\)"):
        cls.execute("gone.safetensors")
    (host.anydressing_dir() / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(Exception, match=r"Load GarmentsNet: junk.safetensors is not a readable .safetensors file"):
        cls.execute("junk.safetensors")
    sd = tiny_sd(1)
    sd2 = {k: (torch.zeros(v.shape[0], 1024) if (".attn2.to_k." in k or ".attn2.to_v." in k) else v)
           for k, v in sd.items()}
    write(host, "sd2like.safetensors", unet=sd2)
    with pytest.raises(Exception, match=r"GarmentsNet UNet is not SD1.5-architecture \(\{'context_dim': 1024"):
        cls.execute("sd2like.safetensors")


def test_apply_errors(host):
    write(host, "wide.safetensors", unet=tiny_sd(2, channels=64))
    msg = run_error(host, gnet_name="wide.safetensors")
    assert msg.startswith("[AnyDressing] Apply Dressing-Attention: GARMENT_FEATURES from wide.safetensors do not fit "
                          "this MODEL (features: input.1.0=64")
    assert "MODEL self-attention: input.1.0=32" in msg and "another model family" in msg
    msg = run_error(host, masks=[(0, 0, 1, 1, 1.0)])
    assert msg == ("[AnyDressing] Apply Dressing-Attention: garment_masks has 1 mask(s) for 2 garment(s) "
                   "(upper, lower); give one mask per garment, in order")
    msg = run_error(host, weights="1.0, 0.5, 2")
    assert msg.startswith("[AnyDressing] Apply Dressing-Attention: garment_weights has 3 value(s) for 2 garment(s)")
    msg = run_error(host, weights="one")
    assert "garment_weights 'one' is not a comma-separated list of numbers" in msg
    msg = run_error(host, start=0.8, end=0.2)
    assert "start_percent (0.8) is after end_percent (0.2)" in msg


def test_garment_weights_change_the_mix(host, store):
    even = run(host, store, "even")
    ones = run(host, store, "ones", weights="1, 1")
    tilted = run(host, store, "tilted", weights="1, 0.2")
    assert rel(ones, even) < 1e-5
    assert rel(tilted, even) > 1e-3
