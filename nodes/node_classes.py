"""The four AnyDressing graph nodes (ComfyUI V1 node API). Thin: validation and wiring; the work is elsewhere."""

from __future__ import annotations

import torch

import folder_paths

from ..anydressing_core.preprocess import MAX_SIDE, MIN_SIDE, border_darkness, image_warnings, prepare_garment
from ..anydressing_core.slots import MAX_GARMENTS, SLOTS
from . import apply as apply_mod
from . import attention_maps as maps_mod
from . import garment_masks as masks_mod
from . import encode as encode_mod
from . import garments_net as gnet_mod
from . import guidance as guidance_mod
from .glue import NodeError, warn

CATEGORY = "AnyDressing"
FOLDER = "anydressing"
DEFAULT_SLOTS = ("upper", "lower", "shoes", "hat", "bag", "other")


def register_model_folder() -> None:
    """models/anydressing/, added with ComfyUI's own add_model_folder_path: the paths (and the extension set) a
    user's extra_model_paths.yaml gave under that name stay as they are."""
    import os

    default = os.path.join(folder_paths.models_dir, FOLDER)
    try:  # created up front so a user sees where AnyDressing files go (a read-only install simply skips it)
        os.makedirs(default, exist_ok=True)
    except OSError:
        pass
    folder_paths.add_model_folder_path(FOLDER, default)


def model_files() -> list[str]:
    """The weight files in the anydressing folders (a training run's .losses.csv beside its file is not one)."""
    extensions = tuple(folder_paths.supported_pt_extensions)
    return [n for n in folder_paths.get_filename_list(FOLDER) if n.lower().endswith(extensions)]


_EXTRA_OK: dict[tuple[str, float, int], bool] = {}  # (path, mtime, size) -> holds only Dressing-Attention weights


def extra_weights_files() -> list[str]:
    """Files of models/anydressing/ that hold only Dressing-Attention weights (e.g. ip_layer.pth).

    Read by key names only (no tensor data) and remembered per file version, so the editor's node list stays fast.
    """
    import os

    from ..anydressing_core.formats import FormatError, holds_only_dressing_weights, read_keys

    found = []
    for name in model_files():
        path = folder_paths.get_full_path(FOLDER, name)
        try:
            st = os.stat(path)
        except (OSError, TypeError):
            continue
        key = (path, st.st_mtime, st.st_size)
        if key not in _EXTRA_OK:
            try:
                _EXTRA_OK[key] = holds_only_dressing_weights(*read_keys(path))
            except FormatError:
                _EXTRA_OK[key] = False
        if _EXTRA_OK[key]:
            found.append(name)
    return found


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
                "garments_net_name": ([gnet_mod.TRAINING_FREE] + model_files(), {
                    "tooltip": "An AnyDressing-format file from ComfyUI/models/anydressing/, or 'training-free' to "
                               "use the connected MODEL's UNet as GarmentsNet."}),
            },
            "optional": {
                "model": ("MODEL", {"tooltip": "Your SD1.5-family checkpoint's MODEL (SDXL: 'training-free' only). Needed for 'training-free' and "
                                               "for files that hold only LoRA / Dressing-Attention weights."}),
                "extra_weights_name": (["none"] + extra_weights_files(), {
                    "default": "none",
                    "tooltip": "A second file with Dressing-Attention weights for the first one, e.g. MagicClothing's "
                               "ip_layer.pth next to garment_extractor.safetensors ('stable')."}),
            },
        }

    def load(self, garments_net_name, model=None, extra_weights_name="none"):
        path = None
        if garments_net_name != gnet_mod.TRAINING_FREE:
            path = _model_path(garments_net_name)
        extra = None if extra_weights_name in (None, "", "none") else _model_path(extra_weights_name)
        return (gnet_mod.load(garments_net_name, path, model, extra),)


def _model_path(name: str) -> "gnet_mod.ModelFile":
    """What ComfyUI's own lookup finds for `name` (only that is ever opened), with where it was expected."""
    import os

    return gnet_mod.ModelFile(name, folder_paths.get_full_path(FOLDER, name),
                              os.path.join(folder_paths.get_folder_paths(FOLDER)[0], name))


def _garment_inputs():
    optional = {"clip": ("CLIP", {"tooltip": "Your checkpoint's CLIP. Needed only by garment models that their "
                                             "authors ran with the empty prompt (MagicClothing, DreamFit)."}),
                "clip_vision": ("CLIP_VISION", {"tooltip": "CLIP ViT-H (the IP-Adapter image encoder). Needed only by "
                                                           "IMAGDressing-v1 files."})}
    for i in range(1, MAX_GARMENTS + 1):
        if i > 1:
            optional[f"image_{i}"] = ("IMAGE", {"tooltip": f"Garment {i} (optional). Any size; a batch adds one "
                                                           f"garment per image, all with slot_{i}."})
            optional[f"slot_{i}"] = (list(SLOTS), {"default": DEFAULT_SLOTS[i - 1],
                                                   "tooltip": f"Which GFE LoRA slot garment {i} uses."})
        optional[f"mask_{i}"] = ("MASK", {"tooltip": f"Transparency of garment {i} (optional): connect Load Image's "
                                                     f"MASK output for a cut-out PNG. Where it is 1 (transparent) the "
                                                     f"garment is composited over white before encoding."})
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
                "vae": ("VAE", {"tooltip": "The VAE of your checkpoint (SD1.5 or SDXL); encodes the garment images."}),
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

    def encode(self, garments_net, vae, image_1, slot_1, width, height, clip=None, clip_vision=None, **optional):
        if not isinstance(garments_net, gnet_mod.GarmentsNet):
            raise NodeError(encode_mod.NODE, "garments_net must come from a Load GarmentsNet node")
        images, slots = [], []
        for i in range(1, MAX_GARMENTS + 1):
            image = image_1 if i == 1 else optional.get(f"image_{i}")
            if image is None:
                continue
            slot = slot_1 if i == 1 else optional.get(f"slot_{i}", DEFAULT_SLOTS[i - 1])
            if image.dim() == 4:
                if 0 < min(image.shape[1:3]) < MIN_SIDE:
                    raise NodeError(encode_mod.NODE, f"image_{i} is {image.shape[2]}x{image.shape[1]} pixels; a "
                                                     f"garment image needs at least {MIN_SIDE} pixels on each side "
                                                     f"(it is scaled to {width}x{height} and would encode as a "
                                                     f"blur): load a larger photo of garment {i}")
                for note in image_warnings(image):
                    warn(f"Encode Garments: image_{i} {note}")
            if max(image.shape[1:3]) > MAX_SIDE:
                warn(f"Encode Garments: image_{i} is {image.shape[2]}x{image.shape[1]}; it is downscaled to at most "
                     f"{MAX_SIDE} pixels a side before fitting it to {width}x{height}")
            mask = optional.get(f"mask_{i}")
            if mask is None and image.dim() == 4 and image.shape[-1] == 3 and min(image.shape[1:3]) > 0 \
                    and border_darkness(image) > 0.8:
                warn(f"Encode Garments: the border of image_{i} is mostly black; if it is a cut-out with "
                     f"transparency, connect Load Image's MASK output to mask_{i} so the background becomes white")
            try:
                prepared = prepare_garment(image, height, width, mask)
            except ValueError as e:
                if "mask" in str(e):
                    raise NodeError(encode_mod.NODE, f"mask_{i}: {e}; connect the MASK of the Load Image that "
                                                     f"loads image_{i}") from None
                raise NodeError(encode_mod.NODE, f"image_{i}: {e}; connect an RGB IMAGE") from None
            images.append(prepared)
            slots.extend([slot] * prepared.shape[0])
        pixels = torch.cat(images, dim=0)
        if pixels.shape[0] > 16:
            raise NodeError(encode_mod.NODE, f"{pixels.shape[0]} garments given; at most 16 are supported in one set")
        latents = vae.encode(pixels)
        features = encode_mod.encode(garments_net, latents, slots, clip, clip_vision, pixels)
        return (features, pixels)


AUTO_STRENGTH = -1.0  # a negative strength means auto; a FLOAT sentinel keeps old saved workflows' values valid


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
                "strength": ("FLOAT", {"default": AUTO_STRENGTH, "min": AUTO_STRENGTH, "max": 3.0, "step": 0.05,
                                       "tooltip": "lambda: how strongly garments enter self-attention. -1 (any "
                                                  "negative value) = auto: the strength the garment model is meant "
                                                  "for (a trained AnyDressing file's recorded value; 1.0 for "
                                                  "MagicClothing, IMAGDressing and DreamFit files; 0.7, the "
                                                  "paper's, for training-free). 0 leaves the MODEL unchanged."}),
                "garment_weights": ("STRING", {"default": "", "multiline": False,
                                               "tooltip": "Optional weight per garment, comma-separated in Encode "
                                                          "Garments order (e.g. '1.0, 0.6'). Empty: all 1.0."}),
                "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                            "tooltip": "Where in the sampling schedule dressing starts (0 = first step)."}),
                "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                          "tooltip": "Where in the sampling schedule dressing ends (1 = last step)."}),
                "apply_to_uncond": (["auto", "no", "yes"], {
                    "default": "auto",
                    "tooltip": "Whether the unconditional (negative) half sees the garments too. auto: what the "
                               "garment model's authors did (no for AnyDressing, paper eq. 16, IMAGDressing and "
                               "MagicClothing; yes for DreamFit)."}),
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
            masks = garment_masks.masks if isinstance(garment_masks, masks_mod.GarmentMasks) else garment_masks
        return (apply_mod.apply(model, garment_features, strength, garment_weights, start_percent, end_percent,
                                apply_to_uncond, masks),)


class GarmentMasksNode:
    DESCRIPTION = ("Builds one mask per garment (in Encode Garments order) from any mix of: a MASK per garment, a box "
                   "per garment, and pose keypoints from a DWPose/OpenPose preprocessor with a region rule per slot "
                   "(upper: shoulders to hips with arms; lower: hips to ankles; dress: shoulders to knees; shoes: "
                   "feet; hat: head; bag/other: mask or box only). Per garment a mask wins over a box, a box over the "
                   "pose. With masks, garment k only reaches pixels inside mask k; an all-zero mask switches it off.")
    CATEGORY = CATEGORY
    FUNCTION = "build"
    RETURN_TYPES = ("GARMENT_MASKS", "MASK")
    RETURN_NAMES = ("garment_masks", "masks")
    OUTPUT_TOOLTIPS = ("For Apply Dressing-Attention's garment_masks input.",
                       "The same masks as a MASK batch, to preview with core nodes.")

    @classmethod
    def INPUT_TYPES(cls):
        optional = {
            "garment_features": ("GARMENT_FEATURES", {"tooltip": "From Encode Garments: tells each garment's slot "
                                                                 "(for the pose rules) and how many garments there "
                                                                 "are."}),
            "pose_keypoint": ("POSE_KEYPOINT", {"tooltip": "Keypoints from a DWPose / OpenPose preprocessor; "
                                                           "garments without a mask or box get their slot's region."}),
            "boxes": ("STRING", {"default": "", "multiline": True,
                                 "tooltip": "One line per garment: 'x0, y0, x1, y1' in pixels (or fractions of the "
                                            "size when all are <= 1); an empty line or '-' means none."}),
        }
        for i in range(1, MAX_GARMENTS + 1):
            optional[f"mask_{i}"] = ("MASK", {"tooltip": f"Region of garment {i} (optional; any size, it is resized "
                                                         f"to width x height)."})
        return {
            "required": {
                "width": ("INT", {"default": 576, "min": 8, "max": 8192, "step": 8,
                                  "tooltip": "Width of the image you generate (the masks' size)."}),
                "height": ("INT", {"default": 768, "min": 8, "max": 8192, "step": 8,
                                   "tooltip": "Height of the image you generate (the masks' size)."}),
                "grow": ("INT", {"default": 0, "min": -512, "max": 512,
                                 "tooltip": "Grow (positive) or shrink (negative) every mask by this many pixels."}),
                "feather": ("INT", {"default": 0, "min": 0, "max": 512,
                                    "tooltip": "Soften mask edges over this many pixels (soft masks scale a "
                                               "garment's share)."}),
                "person_index": ("INT", {"default": 0, "min": 0, "max": 64,
                                         "tooltip": "Which person of the pose to dress (0 = the first)."}),
            },
            "optional": optional,
        }

    def build(self, width, height, grow, feather, person_index, garment_features=None, pose_keypoint=None,
              boxes="", **masks_in):
        return masks_mod.build(width, height, grow, feather, person_index, garment_features, pose_keypoint, boxes,
                               [masks_in.get(f"mask_{i}") for i in range(1, MAX_GARMENTS + 1)])


class GarmentAttentionMaps:
    DESCRIPTION = ("Shows where each garment went: runs the dressed MODEL once at a chosen point of the schedule and "
                   "returns, per garment, how much attention each pixel gives to that garment's tokens (the paper's "
                   "A_k, averaged over heads and the 16 layers), as overlays and as a MASK batch.")
    CATEGORY = CATEGORY
    FUNCTION = "maps"
    RETURN_TYPES = ("IMAGE", "MASK")
    RETURN_NAMES = ("overlays", "maps")
    OUTPUT_TOOLTIPS = ("One image per garment: its attention map tinted over `image`.",
                       "One map per garment, values in [0, 1]; without masks they sum to 1 at every pixel.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The MODEL output of Apply Dressing-Attention."}),
                "positive": ("CONDITIONING", {"tooltip": "The positive conditioning you sample with."}),
                "latent": ("LATENT", {"tooltip": "A latent to look at, e.g. KSampler's output."}),
                "at_percent": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01,
                                         "tooltip": "Point of the schedule to evaluate (0 = pure noise, 1 = the end)."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff,
                                 "tooltip": "Seed of the noise added to reach that point."}),
                "batch_index": ("INT", {"default": 0, "min": 0, "max": 4096,
                                        "tooltip": "Which image of the latent batch to show."}),
            },
            "optional": {
                "image": ("IMAGE", {"tooltip": "Optional image to draw the maps on (e.g. the decoded result)."}),
            },
        }

    def maps(self, model, positive, latent, at_percent, seed, batch_index, image=None):
        return maps_mod.attention_maps(model, positive, latent, at_percent, seed, batch_index, image)


class GarmentGuidance:
    DESCRIPTION = ("MagicClothing's joint garment guidance: each step also evaluates the negative prompt with the "
                   "garments, then x0 = u + garment_scale (g - u) + cfg (t - g), where u is negative text without "
                   "garments, g negative text with them and t the positive prompt with them. KSampler's cfg is the "
                   "text scale. Costs one more row per step.")
    CATEGORY = CATEGORY
    FUNCTION = "apply"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The dressed MODEL with joint garment guidance, for KSampler.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The MODEL output of Apply Dressing-Attention."}),
            "garment_scale": ("FLOAT", {"default": 2.5, "min": 0.0, "max": 30.0, "step": 0.1,
                                        "tooltip": "How strongly the garments are enforced (MagicClothing: 2.5). "
                                                   "Equal to KSampler's cfg gives plain CFG."}),
        }}

    def apply(self, model, garment_scale):
        return (guidance_mod.apply(model, garment_scale),)


NODE_CLASS_MAPPINGS = {
    "AnyDressingLoadGarmentsNet": LoadGarmentsNet,
    "AnyDressingEncodeGarments": EncodeGarments,
    "AnyDressingApplyDressingAttention": ApplyDressingAttention,
    "AnyDressingGarmentMasks": GarmentMasksNode,
    "AnyDressingGarmentAttentionMaps": GarmentAttentionMaps,
    "AnyDressingGarmentGuidance": GarmentGuidance,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "AnyDressingLoadGarmentsNet": "Load GarmentsNet",
    "AnyDressingEncodeGarments": "Encode Garments",
    "AnyDressingApplyDressingAttention": "Apply Dressing-Attention",
    "AnyDressingGarmentMasks": "Garment Masks",
    "AnyDressingGarmentAttentionMaps": "Garment Attention Maps",
    "AnyDressingGarmentGuidance": "Garment Guidance",
}
