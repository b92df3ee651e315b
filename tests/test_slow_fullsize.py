"""Slow (-m slow): a random full-size SD1.5 checkpoint through CheckpointLoaderSimple runs the shipped workflow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from workflow_api import to_api

pytestmark = [pytest.mark.host, pytest.mark.slow]

WORKFLOW = Path(__file__).resolve().parent.parent / "workflows" / "anydressing_upper_lower.json"


def write_random_sd15_checkpoint(path: Path) -> None:
    """Every tensor of an SD1.5 checkpoint (UNet, VAE, CLIP-L text model) with random fp16 weights."""
    import adtest_tiny
    import comfy.sd1_clip
    import comfy.supported_models
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from safetensors.torch import save_file

    cfg = adtest_tiny.tiny_unet_config(320)
    sd = {}
    unet = comfy.supported_models.SD15(cfg).get_model({}, "").diffusion_model
    adtest_tiny.randomize(unet, 0)
    sd.update({f"model.diffusion_model.{k}": v.half() for k, v in unet.state_dict().items()})
    del unet
    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    vae = AutoencoderKL(ddconfig=ddconfig, embed_dim=4)
    adtest_tiny.randomize(vae, 1)
    sd.update({f"first_stage_model.{k}": v.half() for k, v in vae.state_dict().items()})
    del vae
    clip = comfy.sd1_clip.SD1ClipModel(device="cpu", dtype=torch.float32)
    adtest_tiny.randomize(clip, 2)
    for k, v in clip.state_dict().items():
        if k.startswith("clip_l.transformer."):
            sd["cond_stage_model." + k[len("clip_l."):]] = v.half()
    del clip
    save_file(sd, str(path))


def test_shipped_workflow_on_a_full_size_random_sd15(host, store):
    from PIL import Image

    ckpt_dir = host.models_dir / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    wf = json.loads(WORKFLOW.read_text())
    api = to_api(wf, host.nodes.NODE_CLASS_MAPPINGS)
    name = next(n["inputs"]["ckpt_name"] for n in api.values() if n["class_type"] == "CheckpointLoaderSimple")
    if not (ckpt_dir / name).is_file() or (ckpt_dir / name).stat().st_size < 10**9:
        write_random_sd15_checkpoint(ckpt_dir / name)
    inputs = host.base / "input"
    inputs.mkdir(parents=True, exist_ok=True)
    for i, node in enumerate(n for n in api.values() if n["class_type"] == "LoadImage"):
        pixels = (torch.rand(90, 60, 3, generator=torch.Generator().manual_seed(i)) * 255).byte().numpy()
        Image.fromarray(pixels).save(inputs / node["inputs"]["image"])

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
    replaces = store["dressed_model"].model_options["transformer_options"]["patches_replace"]["attn1"]
    widths = sorted({b.layers[k].features.shape[-1] for k, r_ in replaces.items() for b in r_.branches})
    assert len(replaces) == 16 and widths == [320, 640, 1280]
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
