"""Writes the example workflows in workflows/ (ComfyUI UI format). Run: python tools/make_workflows.py

Kept as code so the graphs stay consistent (link ids, slot indices, widget order) when nodes change.
"""

from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "workflows"
AUTO = -1.0  # Apply Dressing-Attention's auto strength (the value the garment model is meant for)
SD15 = {"name": "v1-5-pruned-emaonly-fp16.safetensors",
        "url": "https://huggingface.co/Comfy-Org/stable-diffusion-v1-5-archive/resolve/main/"
               "v1-5-pruned-emaonly-fp16.safetensors",
        "directory": "checkpoints"}
SDXL = {"name": "sd_xl_base_1.0.safetensors",
        "url": "https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/resolve/main/sd_xl_base_1.0.safetensors",
        "directory": "checkpoints"}
OPENPOSE = {"name": "control_v11p_sd15_openpose_fp16.safetensors",
            "url": "https://huggingface.co/comfyanonymous/ControlNet-v1-1_fp16_safetensors/resolve/main/"
                   "control_v11p_sd15_openpose_fp16.safetensors",
            "directory": "controlnet"}
ENCODE_INPUTS = ([("garments_net", "GARMENTS_NET"), ("vae", "VAE"), ("image_1", "IMAGE"), ("clip", "CLIP"),
                  ("clip_vision", "CLIP_VISION"), ("mask_1", "MASK")] +
                 [(name, typ) for i in range(2, 7) for name, typ in ((f"image_{i}", "IMAGE"), (f"mask_{i}", "MASK"))])
MASK_INPUTS = ([("garment_features", "GARMENT_FEATURES"), ("pose_keypoint", "POSE_KEYPOINT")] +
               [(f"mask_{i}", "MASK") for i in range(1, 7)])


class Graph:
    def __init__(self):
        self.nodes: list[dict] = []
        self.links: list[list] = []

    def node(self, type_, pos, widgets, inputs, outputs, title=None, size=(320, 130)) -> int:
        nid = len(self.nodes) + 1
        n = {"id": nid, "type": type_, "pos": list(pos), "size": list(size), "flags": {}, "order": nid - 1, "mode": 0,
             "inputs": [{"name": nm, "type": t, "link": None} for nm, t in inputs],
             "outputs": [{"name": nm, "type": t, "links": [], "slot_index": i} for i, (nm, t) in enumerate(outputs)],
             "properties": {"Node name for S&R": type_}, "widgets_values": list(widgets)}
        if title:
            n["title"] = title
        self.nodes.append(n)
        return nid

    def link(self, src: int, slot: int, dst: int, name: str) -> None:
        a, b = self.nodes[src - 1], self.nodes[dst - 1]
        typ = a["outputs"][slot]["type"]
        lid = max([l[0] for l in self.links], default=0) + 1
        a["outputs"][slot]["links"].append(lid)
        names = [i["name"] for i in b["inputs"]]
        inp = b["inputs"][names.index(name)]
        assert inp["type"] == typ, (b["type"], name, typ)
        inp["link"] = lid
        self.links.append([lid, src, slot, dst, names.index(name), typ])

    def renumber_links(self) -> None:
        """Give links consecutive ids after some were rewired (keeps last_link_id meaningful)."""
        mapping = {old[0]: i + 1 for i, old in enumerate(self.links)}
        self.links = [[mapping[l[0]]] + l[1:] for l in self.links]
        for n in self.nodes:
            for i in n["inputs"]:
                if i["link"] is not None:
                    i["link"] = mapping[i["link"]]
            for o in n["outputs"]:
                o["links"] = [mapping[x] for x in o["links"]]

    def save(self, name: str, note: str, models: list[dict], uid: str) -> None:
        for n in self.nodes:
            n["outputs"] = [dict(o, links=o["links"] or None) for o in n["outputs"]]
        wf = {"id": uid, "revision": 0, "last_node_id": len(self.nodes), "last_link_id": len(self.links),
              "nodes": self.nodes, "links": self.links, "groups": [], "config": {},
              "extra": {"ds": {"scale": 0.7, "offset": [0, 0]}, "note": note}, "version": 0.4, "models": models}
        (OUT / name).write_text(json.dumps(wf, indent=1) + "\n")


def common(g: Graph, garments: list[tuple[str, str]], checkpoint: dict = SD15):
    ckpt = g.node("CheckpointLoaderSimple", (20, 60), [checkpoint["name"]], [],
                  [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")], size=(320, 100))
    pos = g.node("CLIPTextEncode", (420, 40), ["a photo of a woman wearing the garments, standing in a street, "
                                              "full body, best quality"], [("clip", "CLIP")],
                 [("CONDITIONING", "CONDITIONING")], title="Positive prompt", size=(400, 120))
    neg = g.node("CLIPTextEncode", (420, 220), ["lowres, bad anatomy, worst quality, blurry"], [("clip", "CLIP")],
                 [("CONDITIONING", "CONDITIONING")], title="Negative prompt", size=(400, 120))
    g.link(ckpt, 1, pos, "clip")
    g.link(ckpt, 1, neg, "clip")
    images = []
    for i, (slot, file) in enumerate(garments):
        images.append(g.node("LoadImage", (20, 380 + 380 * i), [file, "image"], [],
                             [("IMAGE", "IMAGE"), ("MASK", "MASK")], title=f"{slot.capitalize()} garment",
                             size=(320, 320)))
    gnet = g.node("AnyDressingLoadGarmentsNet", (420, 400), ["training-free", "none"], [("model", "MODEL")],
                  [("garments_net", "GARMENTS_NET")], size=(320, 80))
    g.link(ckpt, 0, gnet, "model")
    slots = [s for s, _ in garments] + ["hat", "bag", "other", "other", "other"]
    enc = g.node("AnyDressingEncodeGarments", (420, 560), [slots[0], 576, 768] + slots[1:6], ENCODE_INPUTS,
                 [("garment_features", "GARMENT_FEATURES"), ("garment_images", "IMAGE")], size=(360, 600))
    g.link(gnet, 0, enc, "garments_net")
    g.link(ckpt, 2, enc, "vae")
    for i, img in enumerate(images, start=1):
        g.link(img, 0, enc, f"image_{i}")
        g.link(img, 1, enc, f"mask_{i}")  # a cut-out PNG's transparency: composited over white, not left black
    return ckpt, pos, neg, enc


MAGIC = {"name": "magic_clothing_768_vitonhd_joint.safetensors",
         "url": "https://huggingface.co/ShineChen1024/MagicClothing/resolve/main/"
                "magic_clothing_768_vitonhd_joint.safetensors",
         "directory": "anydressing"}
FACEID = {"name": "ip-adapter-faceid-plusv2_sd15.bin",
          "url": "https://huggingface.co/h94/IP-Adapter-FaceID/resolve/main/ip-adapter-faceid-plusv2_sd15.bin",
          "directory": "ipadapter"}
FACEID_LORA = {"name": "ip-adapter-faceid-plusv2_sd15_lora.safetensors",
               "url": "https://huggingface.co/h94/IP-Adapter-FaceID/resolve/main/"
                      "ip-adapter-faceid-plusv2_sd15_lora.safetensors",
               "directory": "loras"}
CLIP_H = {"name": "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors",
          "url": "https://huggingface.co/h94/IP-Adapter/resolve/main/models/image_encoder/model.safetensors",
          "directory": "clip_vision"}
STYLE_LORA = {"name": "your_style_lora_sd15.safetensors", "url": "https://civitai.com/models",
              "directory": "loras"}


def sample_and_save(g: Graph, model_ref, pos_ref, neg_ref, vae_ref, latent_ref=None, x=1300, steps=30, cfg=6.0,
                    sampler="ddim", denoise=1.0, size=(576, 768)):
    """KSampler -> VAEDecode -> SaveImage; an EmptyLatentImage when no latent is given. Returns the decode node."""
    if latent_ref is None:
        latent_ref = (g.node("EmptyLatentImage", (880, 700), [size[0], size[1], 1], [], [("LATENT", "LATENT")],
                             size=(320, 110)), 0)
    ks = g.node("KSampler", (x, 60), [0, "fixed", steps, cfg, sampler, "normal", denoise],
                [("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                 ("latent_image", "LATENT")], [("LATENT", "LATENT")], size=(320, 270))
    dec = g.node("VAEDecode", (x, 380), [], [("samples", "LATENT"), ("vae", "VAE")], [("IMAGE", "IMAGE")],
                 size=(220, 50))
    save = g.node("SaveImage", (x + 360, 60), ["AnyDressing"], [("images", "IMAGE")], [], size=(420, 560))
    g.link(*model_ref, ks, "model")
    g.link(*pos_ref, ks, "positive")
    g.link(*neg_ref, ks, "negative")
    g.link(*latent_ref, ks, "latent_image")
    g.link(ks, 0, dec, "samples")
    g.link(*vae_ref, dec, "vae")
    g.link(dec, 0, save, "images")
    return dec


def apply_node(g: Graph, model_ref, enc, strength=AUTO, pos=(880, 400)):
    apply = g.node("AnyDressingApplyDressingAttention", pos, [strength, "", 0.0, 1.0, "auto"],
                   [("model", "MODEL"), ("garment_features", "GARMENT_FEATURES"), ("garment_masks", "GARMENT_MASKS")],
                   [("model", "MODEL")], size=(340, 200))
    g.link(*model_ref, apply, "model")
    g.link(enc, 0, apply, "garment_features")
    return apply


def single_garment():
    g = Graph()
    ckpt, pos, neg, enc = common(g, [("upper", "garment_upper.png")])
    apply = apply_node(g, (ckpt, 0), enc)
    sample_and_save(g, (apply, 0), (pos, 0), (neg, 0), (ckpt, 2))
    g.save("anydressing_single_garment.json",
           "AnyDressing: one garment on your SD1.5 checkpoint, training-free (no extra weights).", [SD15],
           "4b2f6e2a-6f55-4d63-9a5e-0a1d2e55a003")


def with_lora():
    g = Graph()
    ckpt, pos, neg, enc = common(g, [("upper", "garment_upper.png"), ("lower", "garment_lower.png")])
    lora = g.node("LoraLoader", (20, 1180), [STYLE_LORA["name"], 0.8, 0.8], [("model", "MODEL"), ("clip", "CLIP")],
                  [("MODEL", "MODEL"), ("CLIP", "CLIP")], title="Your style / character LoRA", size=(320, 130))
    g.link(ckpt, 0, lora, "model")
    g.link(ckpt, 1, lora, "clip")
    # the prompts read the LoRA'd CLIP; GarmentsNet and Dressing-Attention use the LoRA'd MODEL
    for node in (pos, neg):
        inp = g.nodes[node - 1]["inputs"][0]
        g.links = [l for l in g.links if l[0] != inp["link"]]
        g.nodes[ckpt - 1]["outputs"][1]["links"].remove(inp["link"])
        inp["link"] = None
        g.link(lora, 1, node, "clip")
    gnet = next(n["id"] for n in g.nodes if n["type"] == "AnyDressingLoadGarmentsNet")
    inp = g.nodes[gnet - 1]["inputs"][0]
    g.links = [l for l in g.links if l[0] != inp["link"]]
    g.nodes[ckpt - 1]["outputs"][0]["links"].remove(inp["link"])
    inp["link"] = None
    g.link(lora, 0, gnet, "model")
    apply = apply_node(g, (lora, 0), enc)
    sample_and_save(g, (apply, 0), (pos, 0), (neg, 0), (ckpt, 2))
    g.renumber_links()
    g.save("anydressing_with_lora.json",
           "AnyDressing with a LoRA on the base model: the LoRA reaches the prompts, GarmentsNet (training-free) and "
           "Dressing-Attention's W_k'/W_v'. Pick your own LoRA file.", [SD15, STYLE_LORA],
           "4b2f6e2a-6f55-4d63-9a5e-0a1d2e55a004")


def faceid():
    g = Graph()
    ckpt, pos, neg, enc = common(g, [("upper", "garment_upper.png"), ("lower", "garment_lower.png")])
    face = g.node("LoadImage", (20, 1180), ["face.png", "image"], [], [("IMAGE", "IMAGE"), ("MASK", "MASK")],
                  title="Face for identity", size=(320, 320))
    loader = g.node("IPAdapterUnifiedLoaderFaceID", (880, 40), ["FACEID PLUS V2", 0.6, "CPU"],
                    [("model", "MODEL"), ("ipadapter", "IPADAPTER")], [("MODEL", "MODEL"), ("ipadapter", "IPADAPTER")],
                    title="IPAdapter FaceID loader (ComfyUI_IPAdapter_plus)", size=(320, 130))
    fid = g.node("IPAdapterFaceID", (880, 200), [0.85, 1.0, "linear", "concat", 0.0, 1.0, "V only"],
                 [("model", "MODEL"), ("ipadapter", "IPADAPTER"), ("image", "IMAGE")],
                 [("MODEL", "MODEL"), ("face_image", "IMAGE")], title="IPAdapter FaceID (ComfyUI_IPAdapter_plus)",
                 size=(320, 250))
    g.link(ckpt, 0, loader, "model")
    g.link(loader, 0, fid, "model")
    g.link(loader, 1, fid, "ipadapter")
    g.link(face, 0, fid, "image")
    apply = apply_node(g, (fid, 0), enc)
    sample_and_save(g, (apply, 0), (pos, 0), (neg, 0), (ckpt, 2))
    g.save("anydressing_ipadapter_faceid.json",
           "AnyDressing + identity: IP-Adapter FaceID (needs the ComfyUI_IPAdapter_plus pack and insightface) patches "
           "cross-attention with the face, Dressing-Attention patches self-attention with the garments; both stack.",
           [SD15, FACEID, FACEID_LORA, CLIP_H], "4b2f6e2a-6f55-4d63-9a5e-0a1d2e55a005")


def magicclothing_joint():
    g = Graph()
    ckpt, pos, neg, enc = common(g, [("upper", "garment_upper.png")])
    gnet = next(n for n in g.nodes if n["type"] == "AnyDressingLoadGarmentsNet")
    gnet["widgets_values"] = [MAGIC["name"], "none"]
    g.link(ckpt, 1, enc, "clip")
    apply = apply_node(g, (ckpt, 0), enc)  # auto: 1.0 for MagicClothing files
    guide = g.node("AnyDressingGarmentGuidance", (880, 660), [2.5], [("model", "MODEL")], [("model", "MODEL")],
                   size=(320, 80))
    g.link(apply, 0, guide, "model")
    sample_and_save(g, (guide, 0), (pos, 0), (neg, 0), (ckpt, 2), steps=20, cfg=5.0, sampler="uni_pc")
    g.save("anydressing_magicclothing_joint_guidance.json",
           "MagicClothing weights (garments joined to the latent tokens) with its joint garment guidance: KSampler cfg "
           "is the text scale (5), Garment Guidance the garment scale (2.5). Encode Garments needs the checkpoint's "
           "CLIP for these weights.", [SD15, MAGIC], "4b2f6e2a-6f55-4d63-9a5e-0a1d2e55a006")


def inpainting():
    g = Graph()
    ckpt, pos, neg, enc = common(g, [("upper", "garment_upper.png"), ("lower", "garment_lower.png")])
    person = g.node("LoadImage", (20, 1180), ["person.png", "image"], [], [("IMAGE", "IMAGE"), ("MASK", "MASK")],
                    title="Person photo (paint the clothes area in the mask editor)", size=(320, 320))
    venc = g.node("VAEEncode", (880, 700), [], [("pixels", "IMAGE"), ("vae", "VAE")], [("LATENT", "LATENT")],
                  size=(220, 50))
    noise_mask = g.node("SetLatentNoiseMask", (880, 800), [], [("samples", "LATENT"), ("mask", "MASK")],
                        [("LATENT", "LATENT")], size=(220, 50))
    g.link(person, 0, venc, "pixels")
    g.link(ckpt, 2, venc, "vae")
    g.link(venc, 0, noise_mask, "samples")
    g.link(person, 1, noise_mask, "mask")
    apply = apply_node(g, (ckpt, 0), enc)
    sample_and_save(g, (apply, 0), (pos, 0), (neg, 0), (ckpt, 2), latent_ref=(noise_mask, 0))
    g.save("anydressing_inpaint_person.json",
           "Dress a given person: the photo is VAE-encoded and only the masked area (paint it in LoadImage's mask "
           "editor) is re-generated with the garments.", [SD15], "4b2f6e2a-6f55-4d63-9a5e-0a1d2e55a007")


def upper_lower():
    g = Graph()
    ckpt, pos, neg, enc = common(g, [("upper", "garment_upper.png"), ("lower", "garment_lower.png")])
    apply = apply_node(g, (ckpt, 0), enc)
    sample_and_save(g, (apply, 0), (pos, 0), (neg, 0), (ckpt, 2))
    prev = g.node("PreviewImage", (880, 860), [], [("images", "IMAGE")], [],
                  title="Garments as GarmentsNet sees them", size=(340, 300))
    g.link(enc, 1, prev, "images")
    g.save("anydressing_upper_lower.json",
           "AnyDressing: upper + lower garment on your SD1.5 checkpoint. Load your garment photos, pick your "
           "checkpoint. 'training-free' needs no extra weights; put an AnyDressing .safetensors in "
           "models/anydressing to use trained weights.", [SD15], "4b2f6e2a-6f55-4d63-9a5e-0a1d2e55a001")


def pose_three_garments():
    g = Graph()
    ckpt, pos, neg, enc = common(g, [("upper", "garment_upper.png"), ("lower", "garment_lower.png"),
                                     ("shoes", "garment_shoes.png")])
    ref = g.node("LoadImage", (20, 1520), ["pose_reference.png", "image"], [], [("IMAGE", "IMAGE"), ("MASK", "MASK")],
                 title="Pose reference (a person photo)", size=(320, 320))
    dw = g.node("DWPreprocessor", (420, 1200),
                ["enable", "enable", "enable", 512, "yolox_l.onnx", "dw-ll_ucoco_384_bs5.torchscript.pt", "disable"],
                [("image", "IMAGE")], [("IMAGE", "IMAGE"), ("POSE_KEYPOINT", "POSE_KEYPOINT")],
                title="DWPose (comfyui_controlnet_aux)", size=(320, 220))
    cnl = g.node("ControlNetLoader", (880, 40), [OPENPOSE["name"]], [], [("CONTROL_NET", "CONTROL_NET")],
                 size=(320, 60))
    cna = g.node("ControlNetApplyAdvanced", (880, 140), [1.0, 0.0, 1.0],
                 [("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("control_net", "CONTROL_NET"),
                  ("image", "IMAGE"), ("vae", "VAE")],
                 [("positive", "CONDITIONING"), ("negative", "CONDITIONING")], size=(320, 190))
    masks = g.node("AnyDressingGarmentMasks", (880, 380), [576, 768, 8, 8, 0, ""], MASK_INPUTS,
                   [("garment_masks", "GARMENT_MASKS"), ("masks", "MASK")], size=(360, 420))
    apply = g.node("AnyDressingApplyDressingAttention", (880, 860), [AUTO, "", 0.0, 1.0, "auto"],
                   [("model", "MODEL"), ("garment_features", "GARMENT_FEATURES"), ("garment_masks", "GARMENT_MASKS")],
                   [("model", "MODEL")], size=(340, 200))
    latent = g.node("EmptyLatentImage", (880, 1100), [576, 768, 1], [], [("LATENT", "LATENT")], size=(320, 110))
    ks = g.node("KSampler", (1300, 60), [0, "fixed", 30, 6.0, "ddim", "normal", 1.0],
                [("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                 ("latent_image", "LATENT")], [("LATENT", "LATENT")], size=(320, 270))
    dec = g.node("VAEDecode", (1300, 400), [], [("samples", "LATENT"), ("vae", "VAE")], [("IMAGE", "IMAGE")],
                 size=(220, 50))
    save = g.node("SaveImage", (1700, 60), ["AnyDressing"], [("images", "IMAGE")], [], size=(420, 560))
    maps = g.node("AnyDressingGarmentAttentionMaps", (1300, 500), [0.5, 0, "fixed", 0],
                  [("model", "MODEL"), ("positive", "CONDITIONING"), ("latent", "LATENT"), ("image", "IMAGE")],
                  [("overlays", "IMAGE"), ("maps", "MASK")], size=(320, 200))
    prev = g.node("PreviewImage", (1700, 680), [], [("images", "IMAGE")], [], title="Where each garment went",
                  size=(420, 400))
    pose_prev = g.node("PreviewImage", (420, 1480), [], [("images", "IMAGE")], [], title="Pose", size=(320, 300))
    g.link(ref, 0, dw, "image")
    g.link(pos, 0, cna, "positive")
    g.link(neg, 0, cna, "negative")
    g.link(cnl, 0, cna, "control_net")
    g.link(dw, 0, cna, "image")
    g.link(ckpt, 2, cna, "vae")
    g.link(enc, 0, masks, "garment_features")
    g.link(dw, 1, masks, "pose_keypoint")
    g.link(ckpt, 0, apply, "model")
    g.link(enc, 0, apply, "garment_features")
    g.link(masks, 0, apply, "garment_masks")
    g.link(apply, 0, ks, "model")
    g.link(cna, 0, ks, "positive")
    g.link(cna, 1, ks, "negative")
    g.link(latent, 0, ks, "latent_image")
    g.link(ks, 0, dec, "samples")
    g.link(ckpt, 2, dec, "vae")
    g.link(dec, 0, save, "images")
    g.link(apply, 0, maps, "model")
    g.link(cna, 0, maps, "positive")
    g.link(ks, 0, maps, "latent")
    g.link(dec, 0, maps, "image")
    g.link(maps, 0, prev, "images")
    g.link(dw, 0, pose_prev, "images")
    g.save("anydressing_pose_three_garments.json",
           "AnyDressing with pose: upper + lower + shoes. DWPose (needs the comfyui_controlnet_aux pack) gives the "
           "pose image for the OpenPose ControlNet and the keypoints for Garment Masks, which keeps each garment in "
           "its body region. Garment Attention Maps shows where each garment went.",
           [SD15, OPENPOSE], "4b2f6e2a-6f55-4d63-9a5e-0a1d2e55a002")


def sdxl_training_free():
    g = Graph()
    ckpt, pos, neg, enc = common(g, [("upper", "garment_upper.png"), ("lower", "garment_lower.png")], SDXL)
    apply = apply_node(g, (ckpt, 0), enc)
    sample_and_save(g, (apply, 0), (pos, 0), (neg, 0), (ckpt, 2), cfg=7.0, sampler="euler", size=(832, 1216))
    g.save("anydressing_sdxl_training_free.json",
           "AnyDressing on an SDXL checkpoint, training-free: the checkpoint's own UNet encodes the garments and "
           "its 70 self-attention layers attend to them. No trained AnyDressing weights exist for SDXL; garments are "
           "weaker than with SD1.5 training-free and each garment's features take about 200 MB (fp16) at 1024x1024.",
           [SDXL], "4b2f6e2a-6f55-4d63-9a5e-0a1d2e55a008")


if __name__ == "__main__":
    single_garment()
    upper_lower()
    pose_three_garments()
    with_lora()
    faceid()
    magicclothing_joint()
    inpainting()
    sdxl_training_free()
    print("written:", ", ".join(p.name for p in sorted(OUT.glob("*.json"))))
