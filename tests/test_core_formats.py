"""Host-free: the native file format, garment preprocessing, mask resizing, GFE LoRA hooks, layer names."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from anydressing_core.attention import sdpa_attention
from anydressing_core.encoder import GarmentEncodeHooks
from anydressing_core.layers import format_key, key_from_path, sort_keys
from anydressing_core.lora import LoRA
from anydressing_core.masks import normalize_masks, resize_to_grid
from anydressing_core.native_format import FormatError, parse_native, read_native, write_native
from anydressing_core.preprocess import fit_and_pad, prepare_garment, to_rgb

REPO = Path(__file__).resolve().parent.parent
LAYER = "input_blocks.1.1.transformer_blocks.0"


def test_layer_paths_map_to_comfyui_patch_keys():
    assert key_from_path("input_blocks.1.1.transformer_blocks.0") == ("input", 1, 0)
    assert key_from_path("middle_block.1.transformer_blocks.0") == ("middle", 0, 0)
    assert key_from_path("output_blocks.11.1.transformer_blocks.2") == ("output", 11, 2)
    with pytest.raises(ValueError, match="not a transformer block path"):
        key_from_path("input_blocks.1.0.in_layers.2")
    assert sort_keys([("output", 3, 0), ("middle", 0, 0), ("input", 7, 0)]) == [
        ("input", 7, 0), ("middle", 0, 0), ("output", 3, 0)]
    assert format_key(("output", 9, 0)) == "output.9.0"


def test_native_roundtrip(tmp_path):
    g = torch.Generator().manual_seed(0)
    down, up = torch.randn(4, 32, generator=g), torch.randn(32, 4, generator=g)
    wk, wv = torch.randn(32, 32, generator=g), torch.randn(32, 32, generator=g)
    unet = {"input_blocks.0.0.weight": torch.randn(32, 4, 3, 3, generator=g)}
    path = tmp_path / "garments.safetensors"
    write_native(str(path), unet=unet, loras={"upper": {LAYER: {"q": (down, up, 2.0)}}}, dressing={LAYER: (wk, wv)})
    c = read_native(str(path))
    assert c.unet_naming == "ldm" and torch.equal(c.unet["input_blocks.0.0.weight"], unet["input_blocks.0.0.weight"])
    assert c.slots == ["upper"]
    lora = c.loras["upper"][("input", 1, 0)]["q"]
    assert lora.rank == 4 and lora.scale == pytest.approx(0.5)
    assert torch.equal(c.dressing[("input", 1, 0)]["k"], wk) and torch.equal(c.dressing[("input", 1, 0)]["v"], wv)


def test_native_diffusers_unet_and_default_alpha():
    t = {"garments_net.conv_in.weight": torch.zeros(32, 4, 3, 3),
         f"gfe.lower.{LAYER}.attn1.to_v.lora_down.weight": torch.zeros(8, 32),
         f"gfe.lower.{LAYER}.attn1.to_v.lora_up.weight": torch.zeros(32, 8)}
    c = parse_native(t, {"anydressing_format": "1", "slots": '["lower"]', "lora_alpha": "4"})
    assert c.unet_naming == "diffusers"
    assert c.loras["lower"][("input", 1, 0)]["v"].scale == pytest.approx(0.5)
    c = parse_native(t, {"anydressing_format": "1", "slots": '["lower"]'})
    assert c.loras["lower"][("input", 1, 0)]["v"].scale == pytest.approx(1.0)  # alpha defaults to the rank


def test_native_errors_name_what_was_found(tmp_path):
    with pytest.raises(FormatError, match=r"no 'anydressing_format' metadata; first keys: a\.weight"):
        parse_native({"a.weight": torch.zeros(1)}, {}, "x.safetensors")
    with pytest.raises(FormatError, match=r"format version '2'; this pack reads version '1'"):
        parse_native({}, {"anydressing_format": "2"}, "x.safetensors")
    with pytest.raises(FormatError, match=r"keys this format does not define: weird\.key \(1 keys\); known layouts"):
        parse_native({"weird.key": torch.zeros(1)}, {"anydressing_format": "1"}, "x")
    with pytest.raises(FormatError, match=r"uses slot 'upper', which metadata 'slots' \[\] does not declare"):
        parse_native({f"gfe.upper.{LAYER}.attn1.to_q.lora_down.weight": torch.zeros(2, 8)},
                     {"anydressing_format": "1"}, "x")
    with pytest.raises(FormatError, match=r"must be square \[C, C\]"):
        parse_native({f"dressing.{LAYER}.attn1.to_k.weight": torch.zeros(8, 4)}, {"anydressing_format": "1"}, "x")
    with pytest.raises(FormatError, match="need both to_k and to_v"):
        parse_native({f"dressing.{LAYER}.attn1.to_k.weight": torch.zeros(8, 8)}, {"anydressing_format": "1"}, "x")
    with pytest.raises(FormatError, match="metadata slot 'scarf' is not one of"):
        parse_native({}, {"anydressing_format": "1", "slots": '["scarf"]'}, "x")
    bad = tmp_path / "truncated.safetensors"
    write_native(str(bad), dressing={LAYER: (torch.zeros(8, 8), torch.zeros(8, 8))})
    bad.write_bytes(bad.read_bytes()[:-20])
    with pytest.raises(FormatError, match=r"truncated\.safetensors is not a readable \.safetensors file"):
        read_native(str(bad))
    with pytest.raises(FormatError, match="file not found"):
        read_native(str(tmp_path / "missing.safetensors"))


def test_fit_and_pad_keeps_aspect_and_pads_white():
    img = torch.zeros(1, 100, 50, 3)  # tall black garment
    out = fit_and_pad(img, 64, 64)
    assert out.shape == (1, 64, 64, 3)
    # scaled to 64 x 32, centred: columns 16..47 black, the rest white
    assert torch.all(out[0, :, 16:48] == 0) and torch.all(out[0, :, :16] == 1) and torch.all(out[0, :, 48:] == 1)
    wide = fit_and_pad(torch.zeros(1, 10, 40, 3), 64, 48)
    assert torch.all(wide[0, 26:38] == 0) and torch.all(wide[0, :26] == 1)


def test_channels_and_bad_values():
    gray = torch.full((1, 4, 4, 1), 0.25)
    assert torch.allclose(to_rgb(gray), torch.full((1, 4, 4, 3), 0.25))
    rgba = torch.cat([torch.zeros(1, 4, 4, 3), torch.full((1, 4, 4, 1), 0.5)], dim=-1)
    assert torch.allclose(to_rgb(rgba), torch.full((1, 4, 4, 3), 0.5))  # half-transparent black over white
    with pytest.raises(ValueError, match="NaN or infinite"):
        prepare_garment(torch.full((1, 8, 8, 3), float("nan")), 16, 16)
    with pytest.raises(ValueError, match="has 2 channels"):
        prepare_garment(torch.zeros(1, 8, 8, 2), 16, 16)


def test_mask_resize_keeps_zero_and_mass():
    m = torch.zeros(2, 64, 48)
    m[0, :32] = 1.0
    r = resize_to_grid(m, 8, 6)
    assert r.shape == (2, 48)
    assert torch.equal(r[1], torch.zeros(48))
    assert r[0].mean().item() == pytest.approx(0.5)
    up = resize_to_grid(torch.zeros(1, 4, 4), 16, 16)
    assert torch.equal(up, torch.zeros(1, 256))
    with pytest.raises(ValueError, match="NaN"):
        normalize_masks(torch.tensor([[[float("nan")]]]))


def test_gfe_lora_rows_use_their_slot():
    """Batched pass with per-row LoRA == each row through its own merged weights W + scale * up @ down."""
    g = torch.Generator().manual_seed(3)
    c, heads = 16, 2
    n = torch.randn(3, 5, c, generator=g)
    wq, wk, wv = (torch.randn(c, c, generator=g) for _ in range(3))
    lora_q = LoRA(torch.randn(4, c, generator=g), torch.randn(c, 4, generator=g), 0.5)
    lora_v = LoRA(torch.randn(4, c, generator=g), torch.randn(c, 4, generator=g), 0.25)
    key = ("input", 1, 0)
    hooks = GarmentEncodeHooks(["upper", "lower", "upper"], {"upper": {key: {"q": lora_q, "v": lora_v}}},
                               lambda q, k, v, e: sdpa_attention(q, k, v, e["n_heads"]))
    extra = {"block": ("input", 1), "block_index": 0, "n_heads": heads, "activations_shape": [3, c, 1, 5]}
    hooks.capture(n, n, n, extra)
    out = hooks.gfe_replace(n @ wq.t(), n @ wk.t(), n @ wv.t(), extra)
    assert torch.equal(hooks.captured[key], n)
    for row, slot in enumerate(["upper", "lower", "upper"]):
        q_w = wq + (lora_q.scale * lora_q.up @ lora_q.down if slot == "upper" else 0)
        v_w = wv + (lora_v.scale * lora_v.up @ lora_v.down if slot == "upper" else 0)
        x = n[row:row + 1]
        ref = sdpa_attention(x @ q_w.t(), x @ wk.t(), x @ v_w.t(), heads)
        torch.testing.assert_close(out[row:row + 1], ref, atol=1e-4, rtol=1e-4)


def test_core_imports_nothing_from_comfyui():
    """Architecture rule: anydressing_core is plain torch."""
    banned = {"comfy", "folder_paths", "nodes", "execution", "comfy_extras", "server", "node_helpers"}
    for path in (REPO / "anydressing_core").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            for name in names:
                assert name.split(".")[0] not in banned, f"{path.name} imports {name}"
    code = ("import sys, anydressing_core.branch, anydressing_core.native_format, anydressing_core.encoder; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('comfy', 'folder_paths')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_requirements_list_no_torch():
    reqs = [line.strip() for line in (REPO / "requirements.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    assert sorted(reqs) == ["einops", "numpy", "pillow", "safetensors"]


def test_write_native_accepts_shared_tensors(tmp_path):
    """W_k' initialised as the very tensor W_k (shared memory) still saves."""
    w = torch.randn(8, 8)
    write_native(str(tmp_path / "shared.safetensors"), unet={f"{LAYER}.attn1.to_k.weight": w},
                 dressing={LAYER: (w, w)})
    c = read_native(str(tmp_path / "shared.safetensors"))
    assert torch.equal(c.dressing[("input", 1, 0)]["k"], w) and torch.equal(c.unet[f"{LAYER}.attn1.to_k.weight"], w)


def test_inference_strength_and_feature_tap_come_from_the_file(tmp_path):
    """Apply's auto strength: the recorded training strength; 1.0 for peer formats (their processors have no scale)
    and for trained files from before it was recorded; 0.7 (the paper's) for plain UNets. Old files: attn1 input."""
    from anydressing_core.formats import feature_tap, inference_strength
    from anydressing_core.native_format import NativeContents

    g = torch.Generator().manual_seed(0)
    lora = {"upper": {LAYER: {"q": (torch.randn(4, 32, generator=g), torch.randn(32, 4, generator=g), 4.0)}}}
    path = tmp_path / "trained.safetensors"
    write_native(str(path), loras=lora, extra_metadata={"strength": "0.85", "feature_tap": "gfe_output"})
    c = read_native(str(path))
    assert inference_strength(c) == 0.85 and feature_tap(c) == "gfe_output"
    write_native(str(path), loras=lora)  # a trained file written before issue 13: no strength, no tap
    c = read_native(str(path))
    assert inference_strength(c) == 1.0 and feature_tap(c) == "attn1_input"
    for source in ("magicclothing", "ip_layer", "imagdressing", "dreamfit"):
        assert inference_strength(NativeContents(metadata={"source_format": source})) == 1.0, source
    assert inference_strength(NativeContents(metadata={"source_format": "ldm_unet"})) == 0.7
    with pytest.raises(FormatError, match=r"x.safetensors: metadata strength -1.0 must be a finite number > 0"):
        inference_strength(NativeContents(metadata={"strength": "-1"}), "x.safetensors")
    with pytest.raises(FormatError, match=r"x.safetensors: metadata feature_tap 'attn2' is not one of "
                                          r"attn1_input, gfe_output; update ComfyUI-AnyDressing"):
        feature_tap(NativeContents(metadata={"feature_tap": "attn2"}), "x.safetensors")


def test_gfe_output_tap_keeps_the_lora_self_attention_output():
    """F^new (eq. 4-5): the replacement's own output is the feature, so a layer's LoRA changes that layer's feature;
    under the attn1-input tap the feature is the block's input and the same LoRA leaves it untouched."""
    g = torch.Generator().manual_seed(1)
    n = torch.randn(2, 6, 32, generator=g)
    proj = {p: torch.randn(32, 32, generator=g) / 6 for p in "qkv"}
    key = ("input", 1, 0)
    extra = {"block": ("input", 1), "block_index": 0, "n_heads": 2}
    lora = {"upper": {key: {"v": LoRA(torch.randn(2, 32, generator=g), torch.randn(32, 2, generator=g), 1.0)}}}

    def run(tap, loras):
        hooks = GarmentEncodeHooks(["upper", "upper"], loras, lambda q, k, v, e: sdpa_attention(q, k, v, 2), tap=tap)
        hooks.capture(n, None, None, extra)
        out = hooks.gfe_replace(n @ proj["q"].T, n @ proj["k"].T, n @ proj["v"].T, extra)
        return hooks.captured[key], out

    feat, out = run("gfe_output", lora)
    assert torch.equal(feat, out)
    plain = sdpa_attention(n @ proj["q"].T, n @ proj["k"].T, n @ proj["v"].T + lora["upper"][key]["v"].delta(n), 2)
    assert float((feat - plain).abs().max()) < 1e-5
    assert float((feat - run("gfe_output", {})[0]).abs().max()) > 1e-3  # the LoRA reaches its own layer's feature
    assert torch.equal(run("attn1_input", lora)[0], n)
    with pytest.raises(ValueError, match="feature tap must be one of attn1_input, gfe_output, not 'attn2'"):
        GarmentEncodeHooks(["upper"], {}, sdpa_attention, tap="attn2")


def test_the_training_pages_example_defines_or_imports_everything_it_calls():
    """The training page's Python example is complete: every name it uses is imported or assigned in it (or a
    builtin), and every `from anydressing_train... import x` names something that exists."""
    import builtins
    import importlib
    import re

    training = (REPO / "docs" / "training.md").read_text()
    code = re.search(r"From Python.*?```python\n(.*?)```", training, re.S).group(1)
    tree = ast.parse(code)
    bound = set(dir(builtins))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            bound |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            bound.add(node.id)
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    assert used - bound == set()
    assert {"encode_image", "encode_text"} & used == set()  # no undefined helpers: they come from load_sd15
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module.startswith("anydressing_train"):
            module = importlib.import_module(node.module)
            assert all(hasattr(module, a.name) for a in node.names), node.module
    assert "process_latent_in" in training and "copy_unet" in code
