"""Slow (-m slow): a random full-size SD1.5 checkpoint through CheckpointLoaderSimple runs the shipped workflow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from anydressing_core.workflow_api import to_api

pytestmark = [pytest.mark.host, pytest.mark.slow]

WORKFLOW = Path(__file__).resolve().parent.parent / "workflows" / "anydressing_upper_lower.json"


def random_vae_state() -> dict:
    """The SD1.5/SDXL VAE (AutoencoderKL, 4 latent channels) with random fp16 weights, under first_stage_model."""
    import adtest_tiny
    from comfy.ldm.models.autoencoder import AutoencoderKL

    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    vae = AutoencoderKL(ddconfig=ddconfig, embed_dim=4)
    adtest_tiny.randomize(vae, 1)
    return {f"first_stage_model.{k}": v.half() for k, v in vae.state_dict().items()}


def write_random_sd15_checkpoint(path: Path, **unet_changes) -> None:
    """Every tensor of an SD1.5 checkpoint (UNet, VAE, CLIP-L text model) with random fp16 weights.

    unet_changes (e.g. channel_mult=[1, 1, 1, 1]) make a smaller UNet that ComfyUI still detects as SD1.5 (it keys
    on the 320-channel first level, the 768-wide context and the attention layout), for fast end-to-end tests."""
    import adtest_tiny
    import comfy.sd1_clip
    import comfy.supported_models
    from safetensors.torch import save_file

    cfg = {**adtest_tiny.tiny_unet_config(320), **unet_changes}
    sd = {}
    unet = comfy.supported_models.SD15(cfg).get_model({}, "").diffusion_model
    adtest_tiny.randomize(unet, 0)
    sd.update({f"model.diffusion_model.{k}": v.half() for k, v in unet.state_dict().items()})
    del unet
    sd.update(random_vae_state())
    clip = comfy.sd1_clip.SD1ClipModel(device="cpu", dtype=torch.float32)
    adtest_tiny.randomize(clip, 2)
    for k, v in clip.state_dict().items():
        if k.startswith("clip_l.transformer."):
            sd["cond_stage_model." + k[len("clip_l."):]] = v.half()
    del clip
    save_file(sd, str(path))


def stage_workflow(host, workflow: Path, write_checkpoint) -> tuple[dict, Path]:
    """A shipped workflow as an API prompt, its checkpoint written by `write_checkpoint(path)` under the workflow's
    name and a random 64x96 garment photo in input/ for each Load Image. Returns (API prompt, checkpoint path)."""
    from PIL import Image

    ckpt_dir = host.models_dir / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    api = to_api(json.loads(workflow.read_text()), host.nodes.NODE_CLASS_MAPPINGS)
    name = next(n["inputs"]["ckpt_name"] for n in api.values() if n["class_type"] == "CheckpointLoaderSimple")
    write_checkpoint(ckpt_dir / name)
    inputs = host.base / "input"
    inputs.mkdir(parents=True, exist_ok=True)
    for i, node in enumerate(n for n in api.values() if n["class_type"] == "LoadImage"):
        pixels = (torch.rand(96, 64, 3, generator=torch.Generator().manual_seed(i)) * 255).byte().numpy()
        Image.fromarray(pixels).save(inputs / node["inputs"]["image"])
    return api, ckpt_dir / name


def test_shipped_workflow_on_a_full_size_random_sd15(host, store):
    def write_once(path: Path) -> None:
        if not path.is_file() or path.stat().st_size < 10**9:
            write_random_sd15_checkpoint(path)

    api, _ = stage_workflow(host, WORKFLOW, write_once)

    def prepared(strength: float, key: str) -> dict:
        p = json.loads(json.dumps(api))
        for nid, node in p.items():
            if node["class_type"] == "EmptyLatentImage":
                node["inputs"].update(width=64, height=64)
            if node["class_type"] == "KSampler":
                node["inputs"]["steps"] = 2
                sampler = nid
            if node["class_type"] == "AnyDressingEncodeGarments":
                node["inputs"].update(width=64, height=96)
            if node["class_type"] == "AnyDressingApplyDressingAttention":
                node["inputs"]["strength"] = strength
        p["capture"] = {"class_type": "ADTestCaptureLatent", "inputs": {"key": key, "samples": [sampler, 0]}}
        apply_id = next(n for n, v in p.items() if v["class_type"] == "AnyDressingApplyDressingAttention")
        p["capture_model"] = {"class_type": "ADTestCaptureModel", "inputs": {"key": key + "_model",
                                                                               "model": [apply_id, 0]}}
        return p

    r = host.run(prepared(0.7, "dressed"))
    assert r["success"], r["errors"]
    (branch,) = host.pack_module("nodes.glue").garment_term(store["dressed_model"]).branches
    widths = sorted({layer.features.shape[-1] for layer in branch.layers.values()})
    assert len(branch.layers) == 16 and widths == [320, 640, 1280]
    r = host.run(prepared(0.0, "zero"))
    assert r["success"], r["errors"]
    assert "AnyDressingEncodeGarments" not in [api[n]["class_type"] for n in r["executed"] if n in api]
    p = prepared(0.0, "plain")
    apply_id = next(n for n, v in p.items() if v["class_type"] == "AnyDressingApplyDressingAttention")
    sampler_id = next(n for n, v in p.items() if v["class_type"] == "KSampler")
    p[sampler_id]["inputs"]["model"] = p[apply_id]["inputs"]["model"]
    r = host.run(p)
    assert r["success"], r["errors"]
    assert torch.equal(store["zero"], store["plain"])
    assert float((store["dressed"] - store["plain"]).abs().max()) > 1e-3


FAMILIES = ["native", "comfy_checkpoint", "magicclothing", "magicclothing_stable", "imagdressing", "dreamfit"]


@pytest.fixture(scope="module")
def full_unet(host):
    """A random full-size SD1.5 UNet (ldm and diffusers names), fp16, shared by the family cases."""
    import adtest_tiny
    import comfy.supported_models
    import comfy.utils

    cfg = adtest_tiny.tiny_unet_config(320)
    unet = comfy.supported_models.SD15(cfg).get_model({}, "").diffusion_model
    adtest_tiny.randomize(unet, 5)
    sd = {k: v.half() for k, v in unet.state_dict().items()}
    del unet
    inverse = {v: k for k, v in comfy.utils.unet_to_diffusers(cfg).items()}
    return sd, {inverse[k]: v for k, v in sd.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_full_shape_file_of_each_family_loads(host, full_unet, family):
    import comfy.model_management as mm
    from safetensors.torch import save_file

    from anydressing_core.formats import DIFFUSERS_ATTN1_ORDER
    from anydressing_core.layers import path_from_key
    from anydressing_core.native_format import write_native

    sd, dsd = full_unet
    d = host.anydressing_dir()
    ip = {key: (sd[f"{path_from_key(key)}.attn1.to_k.weight"], sd[f"{path_from_key(key)}.attn1.to_v.weight"])
          for key in DIFFUSERS_ATTN1_ORDER}
    extra = None
    if family == "native":
        name = "full_native.safetensors"
        write_native(str(d / name), unet=sd, dressing={path_from_key(k): v for k, v in ip.items()})
    elif family == "comfy_checkpoint":
        name = "full_ckpt.safetensors"
        save_file({f"model.diffusion_model.{k}": v for k, v in sd.items()}, str(d / name))
    elif family in ("magicclothing", "magicclothing_stable"):
        name = "full_magic.safetensors"
        save_file(dsd, str(d / name))
        if family == "magicclothing_stable":
            extra = "full_ip_layer.pth"
            torch.save({f"{2 * i}.to_{p}_ip.weight": ip[key][j] for i, key in enumerate(DIFFUSERS_ATTN1_ORDER)
                        for j, p in enumerate("kv")}, d / extra)
    elif family == "imagdressing":
        from test_core_peer_formats import random_resampler_weights

        g = torch.Generator().manual_seed(0)
        module = {f"ref_unet.{k}": v for k, v in dsd.items()}
        module.update({f"proj.{k}": v.half() for k, v in random_resampler_weights(
            g, dim=768, embedding=1280, output=768, queries=16, depth=4, inner=768, ff=3072).items()})
        for i, key in enumerate(DIFFUSERS_ATTN1_ORDER):
            module[f"adapter_modules.{2 * i}.to_k_ref.weight"] = ip[key][0]
            module[f"adapter_modules.{2 * i}.to_v_ref.weight"] = ip[key][1]
        name = "full_imag.pt"
        torch.save({"module": module}, d / name)
    else:
        ck = {f"target_unet.{k}": v for k, v in sd.items()}
        for key in DIFFUSERS_ATTN1_ORDER[6:]:
            ck[f"target_unet.{path_from_key(key)}.attn1.ref_to_k.weight"] = ip[key][0]
            ck[f"target_unet.{path_from_key(key)}.attn1.ref_to_v.weight"] = ip[key][1]
        name = "full_dreamfit.ckpt"
        torch.save({"state_dict": ck}, d / name)
    gn = host.pack_module("nodes.load_garments_net")
    gnet = gn.load(name, str(d / name), None, str(d / extra) if extra else None)
    loaded = gnet.patcher.model.diffusion_model.state_dict()
    for k in sorted(sd)[::53]:
        assert torch.equal(loaded[k].half(), sd[k]), k
    enc = host.pack_module("nodes.encode_garments")
    fixtures = host.nodes.NODE_CLASS_MAPPINGS
    feats = enc.encode(gnet, torch.randn(1, 4, 8, 8), ["upper"], fixtures["ADTestStubCLIP"]().run(0)[0],
                       _vision_1280(), torch.rand(1, 64, 64, 3))
    assert sorted({t.shape[-1] for t in feats.layers.values()}) == [320, 640, 1280] and len(feats.layers) == 16
    del gnet, loaded
    mm.unload_all_models()
    for f in (name, extra):
        if f:
            (d / f).unlink()


def _vision_1280():
    class _Out:
        def __init__(self, t):
            self.penultimate_hidden_states = t

    class _Vision:
        def encode_image(self, image):
            return _Out(torch.randn(image.shape[0], 257, 1280, generator=torch.Generator().manual_seed(0)))

    return _Vision()


def test_feature_bank_of_one_garment_at_768x576_fits_40_mb(host, full_unet):
    """Issue 6's memory target, on the real SD1.5 widths: 16 layers of one garment at 768 x 576, stored in fp16."""
    from anydressing_core.native_format import write_native

    sd, _ = full_unet
    d = host.anydressing_dir()
    write_native(str(d / "bank.safetensors"), unet=sd)
    gnet = host.pack_module("nodes.load_garments_net").load("bank.safetensors", str(d / "bank.safetensors"), None)
    feats = host.pack_module("nodes.encode_garments").encode(gnet, torch.randn(1, 4, 96, 72), ["upper"])
    fp16_bytes = sum(t.numel() for t in feats.layers.values()) * 2
    assert fp16_bytes <= 40e6, fp16_bytes
    assert sum(t.shape[1] for t in feats.layers.values()) == 5 * 6912 + 5 * 1728 + 5 * 432 + 108
    (d / "bank.safetensors").unlink()


def training_inputs(host, tmp_path, samples: int) -> Path:
    """A random full-size SD1.5 checkpoint in the host's models/checkpoints and a synthetic data folder."""
    from anydressing_train.data import make_synthetic

    ckpt = host.models_dir / "checkpoints" / "train_base.safetensors"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    if not ckpt.is_file():
        write_random_sd15_checkpoint(ckpt)
    make_synthetic(str(tmp_path / "data"), count=samples, size=64)
    return ckpt


def test_training_command_on_a_full_size_checkpoint(host, tmp_path):
    """python -m anydressing_train: a real SD1.5-shaped checkpoint through ComfyUI's loader, two steps, native file."""
    import os
    import subprocess
    import sys

    import host as host_mod
    from anydressing_core.native_format import read_native

    ckpt = training_inputs(host, tmp_path, samples=2)
    out = tmp_path / "trained.safetensors"
    from safetensors.torch import save_file
    from test_core_texture import random_vgg16_state_dict

    save_file(random_vgg16_state_dict(), str(tmp_path / "vgg16.safetensors"))
    host_mod.add_shims_if_needed()
    r = subprocess.run([sys.executable, "-m", "anydressing_train", "--comfyui", str(host.root), "--checkpoint",
                        str(ckpt), "--data", str(tmp_path / "data"), "--steps", "2", "--rank", "4", "--alpha", "4",
                        "--perceptual-net", str(tmp_path / "vgg16.safetensors"), "--texture-max-t", "1000",
                        "--mixed-precision", "bf16", "--gradient-checkpointing", "--save-every", "1",
                        "--val-fraction", "0.5", "--eval-every", "1",
                        "--out", str(out), "--", "--cpu", "--use-pytorch-cross-attention"],
                       cwd=host_mod.REPO, capture_output=True, text=True, env=dict(os.environ), timeout=1200)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    c = read_native(str(out))
    assert c.slots == ["lower", "upper"] and c.metadata["steps"] == "2" and len(c.dressing) == 16
    assert c.metadata["base_model"] == "train_base.safetensors" and len(c.metadata["base_model_sha256_64mib"]) == 64
    assert c.metadata["mixed_precision"] == "bf16" and c.metadata["processes"] == "1"
    assert all(w.dtype == torch.float32 for d in c.dressing.values() for w in d.values())  # trained weights: fp32
    assert c.metadata["feature_tap"] == "gfe_output" and float(c.metadata["strength"]) == 1.0
    assert c.metadata["loc_reduction"] == "sum" and len(c.loras["upper"]) == 16  # F^new: every layer's LoRA trains
    import csv

    rows = list(csv.DictReader((tmp_path / "trained.safetensors.losses.csv").open()))
    assert [r["step"] for r in rows] == ["0", "1", "2"] and all(float(r["texture"]) > 0 for r in rows[1:])
    assert all(0 < float(r["val_mass_inside_upper"]) < 1 and float(r["val_diffusion"]) > 0 for r in rows)
    ckpt.unlink()


def test_training_command_under_accelerate_launch_with_two_processes(host, tmp_path):
    """accelerate launch -m anydressing_train: two processes (gloo on this CPU machine), one file written, by rank 0."""
    import os
    import subprocess
    import sys

    import host as host_mod
    from anydressing_core.native_format import read_native

    pytest.importorskip("accelerate")
    ckpt = training_inputs(host, tmp_path, samples=4)
    out = tmp_path / "ddp.safetensors"
    host_mod.add_shims_if_needed()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m",
                        "anydressing_train", "--comfyui", str(host.root), "--checkpoint", str(ckpt), "--data",
                        str(tmp_path / "data"), "--steps", "2", "--rank", "4", "--alpha", "4", "--lambda-tex", "0",
                        "--gradient-accumulation-steps", "2", "--out", str(out), "--", "--cpu",
                        "--use-pytorch-cross-attention"],
                       cwd=host_mod.REPO, capture_output=True, text=True, env=env, timeout=1200)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert r.stdout.count("wrote ") == 1  # only the main process saves
    c = read_native(str(out))
    assert c.metadata["processes"] == "2" and c.metadata["batch"] == "4" and c.metadata["steps"] == "2"
    assert (tmp_path / "ddp.safetensors.losses.csv").read_text().count("\n") == 3
    ckpt.unlink()


SDXL_WORKFLOW = Path(__file__).resolve().parent.parent / "workflows" / "anydressing_sdxl_training_free.json"
SDXL_UNET = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
             "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4,
             "model_channels": 320, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
             "channel_mult": [1, 2, 4], "transformer_depth_middle": 10, "use_linear_in_transformer": True,
             "context_dim": 2048, "num_head_channels": 64, "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
             "use_temporal_attention": False, "use_temporal_resblock": False}
# one garment's feature bank at a 1024x1024 garment image: 10 layers of 640 channels on a 64x64 grid and 60 layers of
# 1280 channels on a 32x32 grid (README, "SDXL (training-free)")
SDXL_BANK_1024 = 10 * 64 * 64 * 640 + 60 * 32 * 32 * 1280


def write_random_sdxl_checkpoint(path: Path) -> None:
    """Every tensor of an SDXL base checkpoint (UNet, VAE, CLIP-L and OpenCLIP-G) with random fp16 weights."""
    import adtest_tiny
    import comfy.sdxl_clip
    import comfy.supported_models
    from safetensors.torch import save_file

    config = comfy.supported_models.SDXL(dict(SDXL_UNET))
    config.set_inference_dtype(torch.float16, None)
    model = config.get_model({}, "")
    adtest_tiny.randomize(model.diffusion_model, 0)
    sd = {f"model.{k}": v.half() for k, v in model.state_dict().items() if k.startswith("diffusion_model.")}
    del model
    sd.update(random_vae_state())
    clip = comfy.sdxl_clip.SDXLClipModel(device="cpu", dtype=torch.float16)
    adtest_tiny.randomize(clip, 2)
    sd.update(config.process_clip_state_dict_for_saving({k: v.half() for k, v in clip.state_dict().items()}))
    del clip
    save_file(sd, str(path))


def test_sdxl_training_free_workflow_on_a_full_size_random_sdxl(host, store):
    """The shipped SDXL workflow on a full-size random SDXL: 70 self-attention layers dressed, garments act."""
    api, checkpoint = stage_workflow(host, SDXL_WORKFLOW, write_random_sdxl_checkpoint)
    apply_id = next(n for n, v in api.items() if v["class_type"] == "AnyDressingApplyDressingAttention")
    sampler_id = next(n for n, v in api.items() if v["class_type"] == "KSampler")
    encode_id = next(n for n, v in api.items() if v["class_type"] == "AnyDressingEncodeGarments")

    def prepared(key: str, dressed: bool) -> dict:
        p = json.loads(json.dumps(api))
        for node in p.values():
            if node["class_type"] == "EmptyLatentImage":
                node["inputs"].update(width=64, height=64)
        p[sampler_id]["inputs"]["steps"] = 1
        p[encode_id]["inputs"].update(width=128, height=128)
        if not dressed:
            p[sampler_id]["inputs"]["model"] = p[apply_id]["inputs"]["model"]
        p["capture"] = {"class_type": "ADTestCaptureLatent", "inputs": {"key": key, "samples": [sampler_id, 0]}}
        p["capture_model"] = {"class_type": "ADTestCaptureModel", "inputs": {"key": key + "_model",
                                                                               "model": [apply_id, 0]}}
        return p

    try:
        r = host.run(prepared("dressed", True))
        assert r["success"], r["errors"]
        r_plain = host.run(prepared("plain", False))
    finally:
        checkpoint.unlink()  # 7 GB: not left in the temporary ComfyUI base folder
    (branch,) = host.pack_module("nodes.glue").garment_term(store["dressed_model"]).branches
    assert len(branch.layers) == 70
    widths = sorted({layer.features.shape[-1] for layer in branch.layers.values()})
    assert widths == [640, 1280]
    per_garment = sum(layer.features.shape[1] * layer.features.shape[2] for layer in branch.layers.values()) // 2
    assert per_garment * (1024 * 1024) // (128 * 128) == SDXL_BANK_1024 == 104_857_600  # 200 MiB in fp16
    assert r_plain["success"], r_plain["errors"]
    assert torch.isfinite(store["dressed"]).all()
    assert float((store["dressed"] - store["plain"]).abs().max()) > 1e-3
