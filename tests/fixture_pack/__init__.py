"""Test-only node pack: tiny SD1.5-architecture MODEL / VAE, random conditioning and garments, capture nodes.

Loaded by the host tests through ComfyUI's own custom-node loader, next to the AnyDressing pack.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import adtest_tiny as tiny  # noqa: E402

STORE = tiny.STORE
CALLS = tiny.CALLS


class TinyModel:
    CATEGORY = "AnyDressing tests"
    FUNCTION = "run"
    RETURN_TYPES = ("MODEL",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0}), "model_channels": ("INT", {"default": 32})},
                "optional": {"weight_dtype": (["float32", "float16", "bfloat16"], {"default": "float32"})}}

    def run(self, seed, model_channels, weight_dtype="float32"):
        return (tiny.tiny_model_patcher(seed, model_channels, getattr(torch, weight_dtype)),)


class TinyVAE:
    CATEGORY = "AnyDressing tests"
    FUNCTION = "run"
    RETURN_TYPES = ("VAE",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0})}}

    def run(self, seed):
        return (tiny.tiny_vae(seed),)


class RandomConditioning:
    CATEGORY = "AnyDressing tests"
    FUNCTION = "run"
    RETURN_TYPES = ("CONDITIONING",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0})}}

    def run(self, seed):
        g = torch.Generator().manual_seed(seed)
        return ([[torch.randn((1, 77, 768), generator=g), {}]],)


class GarmentImage:
    CATEGORY = "AnyDressing tests"
    FUNCTION = "run"
    RETURN_TYPES = ("IMAGE",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0}), "width": ("INT", {"default": 64}),
                             "height": ("INT", {"default": 80})}}

    def run(self, seed, width, height):
        return (tiny.garment_image(seed, width, height),)


class BoxMask:
    CATEGORY = "AnyDressing tests"
    FUNCTION = "run"
    RETURN_TYPES = ("MASK",)

    @classmethod
    def INPUT_TYPES(cls):
        f = ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0})
        return {"required": {"width": ("INT", {"default": 64}), "height": ("INT", {"default": 64}), "x0": f,
                             "y0": f, "x1": f, "y1": f, "value": ("FLOAT", {"default": 1.0})}}

    def run(self, width, height, x0, y0, x1, y1, value):
        m = torch.zeros((1, height, width))
        m[:, int(round(y0 * height)):int(round(y1 * height)), int(round(x0 * width)):int(round(x1 * width))] = value
        return (m,)


class StubCLIP:
    """Stands in for ComfyUI's CLIP where only tokenize / encode_from_tokens are used (a text embedding per prompt)."""

    CATEGORY = "AnyDressing tests"
    FUNCTION = "run"
    RETURN_TYPES = ("CLIP",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0})}}

    def run(self, seed):
        class _Clip:
            def tokenize(self, text):
                return {"text": text}

            def encode_from_tokens(self, tokens):
                g = torch.Generator().manual_seed(seed + len(tokens["text"]))
                return torch.randn((1, 77, 768), generator=g)

        return (_Clip(),)


class StubCLIPVision:
    """Stands in for ComfyUI's CLIP_VISION where only encode_image(...).penultimate_hidden_states is used."""

    CATEGORY = "AnyDressing tests"
    FUNCTION = "run"
    RETURN_TYPES = ("CLIP_VISION",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"width": ("INT", {"default": 20})}}

    def run(self, width):
        class _Out:
            def __init__(self, t):
                self.penultimate_hidden_states = t

        class _Vision:
            def encode_image(self, image):
                pooled = torch.nn.functional.adaptive_avg_pool2d(image.permute(0, 3, 1, 2), (16, 16))
                tokens = pooled.flatten(2).transpose(1, 2)  # [B, 256, 3]
                g = torch.Generator().manual_seed(0)
                proj = torch.randn((3, width), generator=g)
                return _Out(torch.cat([tokens.mean(1, keepdim=True), tokens], 1) @ proj)

        return (_Vision(),)


class Checkpoint:
    """CheckpointLoaderSimple's signature with a tiny MODEL, a random (full-size) CLIP-L and a tiny VAE, for running
    shipped workflows with tiny models substituted for the named files."""

    CATEGORY = "AnyDressing tests"
    FUNCTION = "run"
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"ckpt_name": ("STRING", {"default": ""})}}

    def run(self, ckpt_name):
        return (tiny.tiny_model_patcher(0), tiny.random_clip(), tiny.tiny_vae(0))


class LoraLoaderStandIn:
    """LoraLoader's signature: a random weight patch on the MODEL's attn1 to_k/to_v, CLIP passed through."""

    CATEGORY = "AnyDressing tests"
    FUNCTION = "run"
    RETURN_TYPES = ("MODEL", "CLIP")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "clip": ("CLIP",), "lora_name": ("STRING", {"default": ""}),
                             "strength_model": ("FLOAT", {"default": 1.0}), "strength_clip": ("FLOAT", {"default": 1.0})}}

    def run(self, model, clip, lora_name, strength_model, strength_clip):
        return (AddLoRA().run(model, 4, strength_model, False)[0], clip)


class CaptureLatent:
    CATEGORY = "AnyDressing tests"
    FUNCTION = "run"
    RETURN_TYPES = ()
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"key": ("STRING", {"default": "out"}), "samples": ("LATENT",)}}

    def run(self, key, samples):
        STORE[key] = samples["samples"].clone()
        return {}


class CaptureModel:
    CATEGORY = "AnyDressing tests"
    FUNCTION = "run"
    RETURN_TYPES = ()
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"key": ("STRING", {"default": "model"}), "model": ("MODEL",)}}

    def run(self, key, model):
        STORE[key] = model
        return {}


class CaptureMask:
    CATEGORY = "AnyDressing tests"
    FUNCTION = "run"
    RETURN_TYPES = ()
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"key": ("STRING", {"default": "mask"}), "mask": ("MASK",)},
                "optional": {"image": ("IMAGE",)}}

    def run(self, key, mask, image=None):
        STORE[key] = mask.clone()
        if image is not None:
            STORE[key + "_image"] = image.clone()
        return {}


class Pose:
    """A hand-written OpenPose POSE_KEYPOINT (what DWPose/OpenPose preprocessors output)."""

    CATEGORY = "AnyDressing tests"
    FUNCTION = "run"
    RETURN_TYPES = ("POSE_KEYPOINT",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"json": ("STRING", {"multiline": True, "default": "[]"})}}

    def run(self, json):
        import json as json_mod

        return (json_mod.loads(json),)


class InterruptAt:
    """Raises ComfyUI's interrupt exception at the n-th model call (what the server's progress hook raises)."""

    CATEGORY = "AnyDressing tests"
    FUNCTION = "run"
    RETURN_TYPES = ("MODEL",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "call": ("INT", {"default": 2}),
                             "sleep": ("FLOAT", {"default": 0.0})}}

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return float("nan")  # a fresh counter every run

    def run(self, model, call, sleep):
        import time

        import comfy.model_management
        import comfy.patcher_extension

        state = {"calls": 0}

        def wrapper(executor, *args, **kwargs):
            state["calls"] += 1
            if sleep:
                time.sleep(sleep)
            if call and state["calls"] == call:
                raise comfy.model_management.InterruptProcessingException()
            return executor(*args, **kwargs)

        m = model.clone()
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "adtest_interrupt", wrapper)
        return (m,)


class ForeignAttn1:
    """Installs an attn1 replacement the way another pack would: scaled self-attention that counts its calls."""

    CATEGORY = "AnyDressing tests"
    FUNCTION = "run"
    RETURN_TYPES = ("MODEL",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "scale": ("FLOAT", {"default": 0.5})}}

    def run(self, model, scale):
        import comfy.ldm.modules.attention as attn

        def replace(q, k, v, extra):
            CALLS["foreign_attn1"] += 1
            return attn.optimized_attention(q, k, v, extra["n_heads"]) * scale

        m = model.clone()
        for name, module in m.model.diffusion_model.named_modules():
            if isinstance(module, attn.BasicTransformerBlock):
                parts = name.split(".")
                block = {"input_blocks": "input", "output_blocks": "output", "middle_block": "middle"}[parts[0]]
                m.set_model_attn1_replace(replace, block, 0 if block == "middle" else int(parts[1]), int(parts[-1]))
        return (m,)


class ChainingAttn1:
    """Installs an attn1 replacement on every layer that calls the one it replaces (as packs that chain do), with a
    scale of its own, so a garment term living in that slot would be added twice."""

    CATEGORY = "AnyDressing tests"
    FUNCTION = "run"
    RETURN_TYPES = ("MODEL",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "scale": ("FLOAT", {"default": 0.9})}}

    def run(self, model, scale):
        import comfy.ldm.modules.attention as attn

        m = model.clone()
        current = m.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn1", {})
        for name, module in m.model.diffusion_model.named_modules():
            if isinstance(module, attn.BasicTransformerBlock):
                parts = name.split(".")
                block = {"input_blocks": "input", "output_blocks": "output", "middle_block": "middle"}[parts[0]]
                key = (block, 0 if block == "middle" else int(parts[1]), int(parts[-1]))
                previous = current.get(key)

                def replace(q, k, v, extra, previous=previous):
                    out = previous(q, k, v, extra) if previous is not None else attn.optimized_attention(
                        q, k, v, extra["n_heads"])
                    return out * scale

                m.set_model_attn1_replace(replace, *key)
        return (m,)


class AddLoRA:
    """Adds a random LoRA-style weight patch to every attn1.to_k/to_v, the way ComfyUI's LoraLoader patches weights."""

    CATEGORY = "AnyDressing tests"
    FUNCTION = "run"
    RETURN_TYPES = ("MODEL",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "seed": ("INT", {"default": 0}),
                             "strength": ("FLOAT", {"default": 1.0}), "merge": ("BOOLEAN", {"default": False})}}

    def run(self, model, seed, strength, merge):
        g = torch.Generator().manual_seed(seed)
        diffs = {}
        for k, w in sorted(model.model.state_dict().items()):
            if ".attn1.to_k." in k or ".attn1.to_v." in k:
                diffs[k] = 0.2 * torch.randn(w.shape, generator=g)
        if merge:
            # The same weights baked into a separate model, for comparison. Built fresh (tiny model seed 0), since a
            # shared module may hold another clone's patched weights outside a load.
            fresh = tiny.tiny_model_patcher(0)
            sd = fresh.model.state_dict()
            with torch.no_grad():
                for k, d in diffs.items():
                    sd[k].add_(strength * d)
            return (fresh,)
        m = model.clone()
        m.add_patches({k: (d,) for k, d in diffs.items()}, strength)
        return (m,)


class TinyControlNet:
    """A ControlNet of the tiny UNet's width, through ComfyUI's own ControlNet class (what ControlNetLoader returns)."""

    CATEGORY = "AnyDressing tests"
    FUNCTION = "run"
    RETURN_TYPES = ("CONTROL_NET",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0})}}

    def run(self, seed):
        import comfy.cldm.cldm
        import comfy.controlnet
        import comfy.model_management as mm
        import comfy.ops

        net = comfy.cldm.cldm.ControlNet(hint_channels=3, operations=comfy.ops.disable_weight_init,
                                         **tiny.tiny_unet_config(32))
        tiny.randomize(net, seed)
        return (comfy.controlnet.ControlNet(net, latent_format=None,
                                            load_device=mm.get_torch_device(), manual_cast_dtype=None),)


NODE_CLASS_MAPPINGS = {
    "ADTestTinyControlNet": TinyControlNet,
    "ADTestChainingAttn1": ChainingAttn1,
    "ADTestTinyModel": TinyModel,
    "ADTestTinyVAE": TinyVAE,
    "ADTestConditioning": RandomConditioning,
    "ADTestGarmentImage": GarmentImage,
    "ADTestBoxMask": BoxMask,
    "ADTestCaptureLatent": CaptureLatent,
    "ADTestCaptureModel": CaptureModel,
    "ADTestCaptureMask": CaptureMask,
    "ADTestPose": Pose,
    "ADTestStubCLIP": StubCLIP,
    "ADTestCheckpoint": Checkpoint,
    "ADTestLoraLoader": LoraLoaderStandIn,
    "ADTestStubCLIPVision": StubCLIPVision,
    "ADTestForeignAttn1": ForeignAttn1,
    "ADTestInterruptAt": InterruptAt,
    "ADTestAddLoRA": AddLoRA,
}
