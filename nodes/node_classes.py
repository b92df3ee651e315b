"""The four AnyDressing graph nodes (ComfyUI V1 node API). Thin: validation and wiring; the work is elsewhere."""

from __future__ import annotations

from dataclasses import dataclass

import torch

import folder_paths

from ..anydressing_core.masks import normalize_masks
from ..anydressing_core.preprocess import prepare_garment
from ..anydressing_core.slots import SLOTS
from . import apply as apply_mod
from . import encode as encode_mod
from . import garments_net as gnet_mod
from .glue import NodeError

CATEGORY = "AnyDressing"
FOLDER = "anydressing"
MAX_GARMENTS = 6
DEFAULT_SLOTS = ("upper", "lower", "shoes", "hat", "bag", "other")


def register_model_folder() -> None:
    """models/anydressing/, keeping paths that extra_model_paths.yaml already added under that name."""
    import os

    default = os.path.join(folder_paths.models_dir, FOLDER)
    if FOLDER in folder_paths.folder_names_and_paths:
        paths, _ = folder_paths.folder_names_and_paths[FOLDER]
        if default not in paths:
            paths.append(default)
        folder_paths.folder_names_and_paths[FOLDER] = (paths, set(folder_paths.supported_pt_extensions))
    else:
        folder_paths.folder_names_and_paths[FOLDER] = ([default], set(folder_paths.supported_pt_extensions))


@dataclass
class GarmentMasks:
    """GARMENT_MASKS: one [H, W] mask per garment, in Encode Garments order, values in [0, 1]."""

    masks: torch.Tensor  # [N, H, W] float32

    def __deepcopy__(self, memo):
        return self


class LoadGarmentsNet:
    DESCRIPTION = ("Loads GarmentsNet, the UNet that encodes garments (AnyDressing, run once at t=0), with its per-slot "
                   "Garment-Specific Feature Extractor LoRA and Dressing-Attention weights from an AnyDressing "
                   ".safetensors in models/anydressing/. 'training-free' uses the connected MODEL's own UNet instead, "
                   "with no extra weights and no extra copy in memory.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("GARMENTS_NET",)
    RETURN_NAMES = ("garments_net",)
    OUTPUT_TOOLTIPS = ("The garment encoder, for Encode Garments.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "garments_net_name": ([gnet_mod.TRAINING_FREE] + folder_paths.get_filename_list(FOLDER), {
                    "tooltip": "An AnyDressing-format file from ComfyUI/models/anydressing/, or 'training-free' to "
                               "use the connected MODEL's UNet as GarmentsNet."}),
            },
            "optional": {
                "model": ("MODEL", {"tooltip": "Your SD1.5-family checkpoint's MODEL. Needed for 'training-free' and "
                                               "for files that hold only LoRA / Dressing-Attention weights."}),
            },
        }

    def load(self, garments_net_name, model=None):
        path = None
        if garments_net_name != gnet_mod.TRAINING_FREE:
            path = folder_paths.get_full_path(FOLDER, garments_net_name)
            if path is None:
                import os
                path = os.path.join(folder_paths.get_folder_paths(FOLDER)[0], garments_net_name)
        return (gnet_mod.load(garments_net_name, path, model),)


def _garment_inputs():
    optional = {}
    for i in range(2, MAX_GARMENTS + 1):
        optional[f"image_{i}"] = ("IMAGE", {"tooltip": f"Garment {i} (optional). Any size; a batch adds one garment "
                                                       f"per image, all with slot_{i}."})
        optional[f"slot_{i}"] = (list(SLOTS), {"default": DEFAULT_SLOTS[i - 1],
                                               "tooltip": f"Which GFE LoRA slot garment {i} uses."})
    return optional


class EncodeGarments:
    DESCRIPTION = ("Encodes 1 to 6 garment images with GarmentsNet in one batched pass at t=0 (cross-attention off, each "
                   "garment through its slot's LoRA) and keeps the 16 self-attention inputs of every garment. Runs "
                   "only when its inputs change: re-running with another seed reuses the features.")
    CATEGORY = CATEGORY
    FUNCTION = "encode"
    RETURN_TYPES = ("GARMENT_FEATURES", "IMAGE")
    RETURN_NAMES = ("garment_features", "garment_images")
    OUTPUT_TOOLTIPS = ("Per-layer garment tokens for Apply Dressing-Attention.",
                       "The garments as GarmentsNet saw them (resized and padded), for preview.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "garments_net": ("GARMENTS_NET", {"tooltip": "From Load GarmentsNet."}),
                "vae": ("VAE", {"tooltip": "The VAE of your SD1.5-family checkpoint; encodes the garment images."}),
                "image_1": ("IMAGE", {"tooltip": "Garment 1. Any size or aspect ratio: it is scaled to fit "
                                                 "width x height and padded with white."}),
                "slot_1": (list(SLOTS), {"default": DEFAULT_SLOTS[0], "tooltip": "Which GFE LoRA slot garment 1 uses."}),
                "width": ("INT", {"default": 576, "min": 32, "max": 2048, "step": 8,
                                  "tooltip": "Garment resolution width in pixels (the paper: 576)."}),
                "height": ("INT", {"default": 768, "min": 32, "max": 2048, "step": 8,
                                   "tooltip": "Garment resolution height in pixels (the paper: 768)."}),
            },
            "optional": _garment_inputs(),
        }

    def encode(self, garments_net, vae, image_1, slot_1, width, height, **optional):
        if not isinstance(garments_net, gnet_mod.GarmentsNet):
            raise NodeError(encode_mod.NODE, "garments_net must come from a Load GarmentsNet node")
        images, slots = [], []
        for i in range(1, MAX_GARMENTS + 1):
            image = image_1 if i == 1 else optional.get(f"image_{i}")
            if image is None:
                continue
            slot = slot_1 if i == 1 else optional.get(f"slot_{i}", DEFAULT_SLOTS[i - 1])
            try:
                prepared = prepare_garment(image, height, width)
            except ValueError as e:
                raise NodeError(encode_mod.NODE, f"image_{i}: {e}; connect an RGB IMAGE") from None
            images.append(prepared)
            slots.extend([slot] * prepared.shape[0])
        pixels = torch.cat(images, dim=0)
        if pixels.shape[0] > 16:
            raise NodeError(encode_mod.NODE, f"{pixels.shape[0]} garments given; at most 16 are supported in one set")
        latents = vae.encode(pixels)
        features = encode_mod.encode(garments_net, latents, slots)
        return (features, pixels)


class ApplyDressingAttention:
    DESCRIPTION = ("Patches a copy of the MODEL so every self-attention layer becomes Dressing-Attention: "
                   "O = SelfAttn(Q,K,V) + strength * Attn(Q, F W_k', F W_v') over all garments' tokens (one softmax, "
                   "paper eq. 6). The input MODEL is not changed; chain several to add independent garment sets.")
    CATEGORY = CATEGORY
    FUNCTION = "apply"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The dressed MODEL, for KSampler (works with ControlNet, LoRA and IP-Adapter).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "Your SD1.5-family MODEL (DressingNet). It is cloned, never changed."}),
                "garment_features": ("GARMENT_FEATURES", {"tooltip": "From Encode Garments."}),
                "strength": ("FLOAT", {"default": 0.7, "min": 0.0, "max": 3.0, "step": 0.05,
                                       "tooltip": "lambda: how strongly garments enter self-attention (paper: 0.7). "
                                                  "0 leaves the MODEL unchanged."}),
                "garment_weights": ("STRING", {"default": "", "multiline": False,
                                               "tooltip": "Optional weight per garment, comma-separated in Encode "
                                                          "Garments order (e.g. '1.0, 0.6'). Empty: all 1.0."}),
                "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                            "tooltip": "Where in the sampling schedule dressing starts (0 = first step)."}),
                "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                          "tooltip": "Where in the sampling schedule dressing ends (1 = last step)."}),
                "apply_to_uncond": ("BOOLEAN", {"default": False,
                                                "tooltip": "Let the unconditional (negative) half see the garments too. "
                                                           "Off follows the paper: CFG pushes toward the garments."}),
            },
            "optional": {
                "garment_masks": ("GARMENT_MASKS", {"tooltip": "Optional, from Garment Masks: garment k only reaches "
                                                               "pixels inside mask k (soft masks scale it)."}),
            },
        }

    def apply(self, model, garment_features, strength, garment_weights, start_percent, end_percent, apply_to_uncond,
              garment_masks=None):
        masks = None
        if garment_masks is not None:
            masks = garment_masks.masks if isinstance(garment_masks, GarmentMasks) else garment_masks
        return (apply_mod.apply(model, garment_features, strength, garment_weights, start_percent, end_percent,
                                apply_to_uncond, masks),)


class GarmentMasksNode:
    DESCRIPTION = ("Builds GARMENT_MASKS from one MASK per garment, in Encode Garments order. With masks, garment k "
                   "is seen only by pixels inside mask k (soft masks honoured); an all-zero mask switches that garment "
                   "off.")
    CATEGORY = CATEGORY
    FUNCTION = "build"
    RETURN_TYPES = ("GARMENT_MASKS", "MASK")
    RETURN_NAMES = ("garment_masks", "masks")
    OUTPUT_TOOLTIPS = ("For Apply Dressing-Attention's garment_masks input.",
                       "The same masks as a MASK batch, to preview with core nodes.")

    @classmethod
    def INPUT_TYPES(cls):
        optional = {f"mask_{i}": ("MASK", {"tooltip": f"Region of garment {i} (optional)."})
                    for i in range(2, MAX_GARMENTS + 1)}
        return {
            "required": {"mask_1": ("MASK", {"tooltip": "Region of garment 1 in the output image (any size; it is "
                                                        "resized to each attention layer)."})},
            "optional": optional,
        }

    def build(self, mask_1, **optional):
        node = "Garment Masks"
        masks = []
        for i in range(1, MAX_GARMENTS + 1):
            m = mask_1 if i == 1 else optional.get(f"mask_{i}")
            if m is None:
                continue
            if m.dim() == 2:
                m = m.unsqueeze(0)
            try:
                m = normalize_masks(m)
            except ValueError as e:
                raise NodeError(node, f"mask_{i}: {e}") from None
            masks.append(m)
        h, w = masks[0].shape[-2:]
        fitted = []
        for m in masks:
            if m.shape[-2:] != (h, w):
                m = torch.nn.functional.interpolate(m.unsqueeze(1), size=(h, w), mode="bilinear",
                                                    align_corners=False).squeeze(1)
            fitted.append(m)
        stacked = torch.cat(fitted, dim=0)
        return (GarmentMasks(stacked), stacked)


NODE_CLASS_MAPPINGS = {
    "AnyDressingLoadGarmentsNet": LoadGarmentsNet,
    "AnyDressingEncodeGarments": EncodeGarments,
    "AnyDressingApplyDressingAttention": ApplyDressingAttention,
    "AnyDressingGarmentMasks": GarmentMasksNode,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "AnyDressingLoadGarmentsNet": "Load GarmentsNet",
    "AnyDressingEncodeGarments": "Encode Garments",
    "AnyDressingApplyDressingAttention": "Apply Dressing-Attention",
    "AnyDressingGarmentMasks": "Garment Masks",
}
