"""API-format prompts for the host tests (tiny models through the real executor)."""

from __future__ import annotations


def dressing_prompt(*, strength: float = 0.7, garments=((1, "upper"), (2, "lower")), seed: int = 0,
                    latent_w: int = 64, latent_h: int = 64, cfg: float = 5.0, steps: int = 2, masks=None,
                    weights: str = "", include_uncond: bool = False, gnet_name: str = "training-free",
                    capture_key: str = "out", patched: bool = True, extra_apply=None, pre_model=None,
                    garment_size=(48, 64), start=0.0, end=1.0, sampler="euler", batch: int = 1) -> dict:
    """A graph of the dressing nodes (Load GarmentsNet, Encode Garments, Garment Masks, Apply) plus KSampler.
    garments: (image seed, slot) per garment; masks: list of boxes."""
    p: dict = {
        "model": {"class_type": "ADTestTinyModel", "inputs": {"seed": 0, "model_channels": 32}},
        "vae": {"class_type": "ADTestTinyVAE", "inputs": {"seed": 0}},
        "pos": {"class_type": "ADTestConditioning", "inputs": {"seed": 1}},
        "neg": {"class_type": "ADTestConditioning", "inputs": {"seed": 2}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": latent_w, "height": latent_h, "batch_size": batch}},
    }
    base_model = ["model", 0]
    if pre_model:
        for nid, node in pre_model.items():
            p[nid] = node
        base_model = [list(pre_model)[-1], 0]
    model_ref = base_model
    if patched:
        p["gnet"] = {"class_type": "AnyDressingLoadGarmentsNet",
                     "inputs": {"garments_net_name": gnet_name, "model": base_model}}
        enc = {"garments_net": ["gnet", 0], "vae": ["vae", 0], "width": garment_size[0], "height": garment_size[1]}
        for i, garment in enumerate(garments, start=1):
            img_seed, slot = garment[0], garment[1]
            w, h = garment[2:4] if len(garment) >= 4 else (64, 80)  # the photo; encoded at garment_size
            p[f"img{i}"] = {"class_type": "ADTestGarmentImage", "inputs": {"seed": img_seed, "width": w, "height": h}}
            enc[f"image_{i}"] = [f"img{i}", 0]
            enc[f"slot_{i}"] = slot
        p["encode"] = {"class_type": "AnyDressingEncodeGarments", "inputs": enc}
        apply = {"model": base_model, "garment_features": ["encode", 0], "strength": strength,
                 "garment_weights": weights, "start_percent": start, "end_percent": end,
                 "apply_to_uncond": "yes" if include_uncond else "auto"}
        if masks is not None:
            gm = {"width": latent_w, "height": latent_h, "grow": 0, "feather": 0, "person_index": 0}
            for i, box in enumerate(masks, start=1):
                x0, y0, x1, y1, value = box
                p[f"mask{i}"] = {"class_type": "ADTestBoxMask",
                                 "inputs": {"width": latent_w, "height": latent_h, "x0": x0, "y0": y0, "x1": x1,
                                            "y1": y1, "value": value}}
                gm[f"mask_{i}"] = [f"mask{i}", 0]
            p["masks"] = {"class_type": "AnyDressingGarmentMasks", "inputs": gm}
            apply["garment_masks"] = ["masks", 0]
        p["apply"] = {"class_type": "AnyDressingApplyDressingAttention", "inputs": apply}
        model_ref = ["apply", 0]
        if extra_apply:
            for nid, node in extra_apply(model_ref).items():
                p[nid] = node
            model_ref = [list(extra_apply(model_ref))[-1], 0]
    p["sampler"] = {"class_type": "KSampler",
                    "inputs": {"model": model_ref, "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": sampler,
                               "scheduler": "normal", "positive": ["pos", 0], "negative": ["neg", 0],
                               "latent_image": ["latent", 0], "denoise": 1.0}}
    p["capture"] = {"class_type": "ADTestCaptureLatent", "inputs": {"key": capture_key, "samples": ["sampler", 0]}}
    return p


def second_apply(model_ref, strength: float = 0.7) -> dict:
    """A second Encode Garments (one 'shoes' garment) and Apply Dressing-Attention on `model_ref`, for stacking tests."""
    return {
        "img9": {"class_type": "ADTestGarmentImage", "inputs": {"seed": 9, "width": 64, "height": 80}},
        "encode2": {"class_type": "AnyDressingEncodeGarments",
                    "inputs": {"garments_net": ["gnet", 0], "vae": ["vae", 0], "image_1": ["img9", 0],
                               "slot_1": "shoes", "width": 48, "height": 64}},
        "apply2": {"class_type": "AnyDressingApplyDressingAttention",
                   "inputs": {"model": model_ref, "garment_features": ["encode2", 0], "strength": strength,
                              "garment_weights": "", "start_percent": 0.0, "end_percent": 1.0,
                              "apply_to_uncond": "auto"}},
    }
