"""Encode Garments: GarmentsNet once at t=0 over all garments in one batched pass; the GARMENT_FEATURES it keeps."""

from __future__ import annotations

import torch
from comfy_api.latest import io

from ..anydressing_core.encoder import (TAP_INPUT, TAP_OUTPUT, GarmentEncodeHooks, zero_cross_attention_output,
                                        zero_cross_attention_replace)
from ..anydressing_core.features import GarmentFeatures
from ..anydressing_core.formats import TRAINING_FREE_STRENGTH
from ..anydressing_core.layers import format_key
from ..anydressing_core.preprocess import MAX_SIDE, MIN_SIDE, border_darkness, image_warnings, prepare_garment
from ..anydressing_core.slots import MAX_GARMENTS, SLOTS
from . import glue, io_types
from .load_garments_net import GarmentsNet

NODE = "Encode Garments"


def check_loras(gnet: GarmentsNet, channels: dict) -> None:
    for slot, layers in gnet.loras.items():
        for key, projs in layers.items():
            if key not in channels:
                raise glue.NodeError(NODE, f"{gnet.source}: LoRA for slot {slot!r} names layer {format_key(key)}, "
                                           f"which this GarmentsNet does not have")
            for proj, lora in projs.items():
                c = channels[key]
                if lora.down.shape[1] != c or lora.up.shape[0] != c:
                    raise glue.NodeError(NODE, f"{gnet.source}: LoRA for slot {slot!r} layer {format_key(key)} "
                                               f"to_{proj} is for width {lora.down.shape[1]}, the layer has {c}")


def empty_prompt_context(clip, n: int) -> torch.Tensor:
    """The empty prompt's text embedding, which MagicClothing feeds its garment UNet."""
    tokens = clip.tokenize("")
    cond = clip.encode_from_tokens(tokens)
    return cond.expand(n, -1, -1)


def image_context(gnet: GarmentsNet, clip_vision, pixels: torch.Tensor) -> torch.Tensor:
    """IMAGDressing: CLIP vision penultimate features of each garment through the file's resampler."""
    if clip_vision is None:
        raise glue.NodeError(NODE, f"{gnet.source} builds GarmentsNet's context from CLIP ViT-H image features, as its "
                                   f"authors did: connect a CLIP Vision Loader (the ViT-H model used for IP-Adapter) "
                                   f"to the 'clip_vision' input")
    out = clip_vision.encode_image(pixels)
    feats = getattr(out, "penultimate_hidden_states", None)
    if feats is None:
        feats = out["penultimate_hidden_states"]
    if feats.shape[-1] != gnet.image_proj.embedding_dim:
        raise glue.NodeError(NODE, f"the CLIP vision model gives {feats.shape[-1]}-wide features but {gnet.source} "
                                   f"expects {gnet.image_proj.embedding_dim} (CLIP ViT-H/14): load that CLIP vision "
                                   f"model")
    with torch.no_grad():
        return gnet.image_proj(feats.float().cpu())


def encode(gnet: GarmentsNet, latents: torch.Tensor, row_slots: list[str], clip=None, clip_vision=None,
           pixels: torch.Tensor = None) -> GarmentFeatures:
    """latents: raw VAE latents [N, 4, h, w]; row k is garment k with slot row_slots[k]."""
    image_ctx = image_context(gnet, clip_vision, pixels) if gnet.image_proj is not None else None
    if gnet.text_context and clip is None:
        raise glue.NodeError(NODE, f"{gnet.source} runs its garment UNet with the empty prompt's text embedding, as "
                                   f"its authors did: connect your checkpoint's CLIP to the 'clip' input")
    patcher = gnet.patcher
    glue.load_for_inference([patcher])
    model = patcher.model
    dm = model.diffusion_model
    blocks = glue.self_attention_layers(dm)
    if not blocks:
        raise glue.NodeError(NODE, f"GarmentsNet {gnet.source} has no self-attention layers to take features from")
    channels = glue.layer_channels(blocks)
    check_loras(gnet, channels)
    for slot in sorted(set(row_slots)):
        if gnet.loras and slot not in gnet.loras:
            glue.warn(f"{NODE}: {gnet.source} has no GFE LoRA for slot {slot!r} (it has: {', '.join(gnet.slots)}); "
                      f"that garment is encoded with the base weights")

    device = patcher.load_device
    dtype = glue.compute_dtype(model)
    x = model.process_latent_in(latents.to(torch.float32)).to(device=device, dtype=dtype)
    n = x.shape[0]
    context_dim = int(model.model_config.unet_config.get("context_dim", 768))
    timesteps = torch.zeros((n,), device=device, dtype=torch.float32)

    tap = getattr(gnet, "feature_tap", TAP_INPUT)
    progress = glue.progress_bar(len(blocks))  # one tick per layer, like KSampler's per step
    hooks = GarmentEncodeHooks(row_slots, gnet.loras, glue.self_attention, tap=tap, on_layer=progress)
    if image_ctx is not None:
        context = image_ctx.to(device=device, dtype=dtype)
        transformer_options = {"patches": {"attn1_patch": [hooks.capture]}, "patches_replace": {}}
    elif gnet.text_context:
        context = empty_prompt_context(clip, n).to(device=device, dtype=dtype)
        transformer_options = {"patches": {"attn1_patch": [hooks.capture]}, "patches_replace": {}}
    else:  # the paper excises cross-attention: its output is zeroed
        context = torch.zeros((n, 1, context_dim), device=device, dtype=dtype)
        transformer_options = {
            "patches": {"attn1_patch": [hooks.capture], "attn2_output_patch": [zero_cross_attention_output]},
            "patches_replace": {"attn2": {k: zero_cross_attention_replace for k in blocks}},
        }
    if tap == TAP_OUTPUT or any(slot in gnet.loras for slot in row_slots):  # F^new is kept by the replacement
        transformer_options["patches_replace"]["attn1"] = {k: hooks.gfe_replace for k in blocks}
    with torch.no_grad():
        extra = {}
        adm = model.model_config.unet_config.get("adm_in_channels")
        if adm:  # class-conditioned UNets (SDXL in training-free mode) need a vector: a neutral zero one
            extra["y"] = torch.zeros((n, int(adm)), device=device, dtype=dtype)
        dm(x, timesteps=timesteps, context=context, transformer_options=transformer_options, **extra)

    missing = [format_key(k) for k in blocks if k not in hooks.captured]
    if missing:
        raise glue.NodeError(NODE, f"GarmentsNet pass did not reach layers {', '.join(missing)}")
    store = glue.intermediate_device()
    captured = {k: hooks.captured[k].to(store) for k in blocks}
    dressing = {k: (d.get("k"), d.get("v")) for k, d in gnet.dressing.items()}
    feats = GarmentFeatures.from_batched(row_slots, captured, dressing_weights=dressing,
                                         source=gnet.source, injection=gnet.injection,
                                         uncond_default=gnet.uncond_default,
                                         weighted_layers_only=gnet.weighted_layers_only,
                                         strength=getattr(gnet, "strength", TRAINING_FREE_STRENGTH))
    glue.info(f"{NODE}: encoded {n} garment(s) ({', '.join(row_slots)}) with {gnet.source} ({tap} features): "
              f"{len(blocks)} layers, "
              f"{feats.nbytes_per_garment() / 2**20:.1f} MiB per garment")
    return feats


DEFAULT_SLOTS = ("upper", "lower", "shoes", "hat", "bag", "other")


def _garment_inputs() -> list:
    """clip, clip_vision, then mask_1 and image_i, slot_i, mask_i for i = 2..6: the V1 node's order, so the widget
    values of saved workflows keep their places."""
    inputs = [io.Clip.Input("clip", optional=True,
                            tooltip="Your checkpoint's CLIP. Needed only by garment models that their authors ran "
                                    "with the empty prompt (MagicClothing, DreamFit)."),
              io.ClipVision.Input("clip_vision", optional=True,
                                  tooltip="CLIP ViT-H (the IP-Adapter image encoder). Needed only by IMAGDressing-v1 "
                                          "files.")]
    for i in range(1, MAX_GARMENTS + 1):
        if i > 1:
            inputs.append(io.Image.Input(f"image_{i}", optional=True,
                                         tooltip=f"Garment {i} (optional). Any size; a batch adds one garment per "
                                                 f"image, all with slot_{i}."))
            inputs.append(io.Combo.Input(f"slot_{i}", options=list(SLOTS), default=DEFAULT_SLOTS[i - 1],
                                         optional=True, tooltip=f"Which GFE LoRA slot garment {i} uses."))
        inputs.append(io.Mask.Input(f"mask_{i}", optional=True,
                                    tooltip=f"Transparency of garment {i} (optional): connect Load Image's MASK output "
                                            f"for a cut-out PNG. Where it is 1 (transparent) the garment is "
                                            f"composited over white before encoding."))
    return inputs


class EncodeGarments(io.ComfyNode):
    """The node: up to six garment images (with their slots and transparency) in, GARMENT_FEATURES out."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AnyDressingEncodeGarments",
            display_name=NODE,
            category=io_types.CATEGORY,
            description="Encodes 1 to 6 garment images with GarmentsNet in one batched pass at t=0 (cross-attention "
                        "off, each garment through its slot's LoRA) and keeps every garment's features at the 16 "
                        "self-attention layers (the layer inputs after norm1, or the GFE self-attention outputs for "
                        "files trained with that tap). Runs only when its inputs change: re-running with another "
                        "seed reuses the features.",
            inputs=[
                io_types.GarmentsNet.Input("garments_net", tooltip="From Load GarmentsNet."),
                io.Vae.Input("vae", tooltip="The VAE of your checkpoint (SD1.5 or SDXL); encodes the garment images."),
                io.Image.Input("image_1", tooltip="Garment 1. Any size or aspect ratio: it is scaled to fit width x "
                                                  "height and padded with white."),
                io.Combo.Input("slot_1", options=list(SLOTS), default=DEFAULT_SLOTS[0],
                               tooltip="Which GFE LoRA slot garment 1 uses."),
                io.Int.Input("width", default=576, min=32, max=2048, step=8,
                             tooltip="Garment resolution width in pixels (the paper: 576)."),
                io.Int.Input("height", default=768, min=32, max=2048, step=8,
                             tooltip="Garment resolution height in pixels (the paper: 768)."),
            ] + _garment_inputs(),
            outputs=[
                io_types.GarmentFeatures.Output(display_name="garment_features",
                                                tooltip="Per-layer garment tokens for Apply Dressing-Attention."),
                io.Image.Output(display_name="garment_images",
                                tooltip="The garments as GarmentsNet saw them (resized and padded), for preview."),
            ],
        )

    @classmethod
    def execute(cls, garments_net, vae, image_1, slot_1, width, height, clip=None, clip_vision=None,
                **optional) -> io.NodeOutput:
        if not isinstance(garments_net, GarmentsNet):
            raise glue.NodeError(NODE, "garments_net must come from a Load GarmentsNet node")
        images, slots = [], []
        for i in range(1, MAX_GARMENTS + 1):
            image = image_1 if i == 1 else optional.get(f"image_{i}")
            if image is None:
                continue
            slot = slot_1 if i == 1 else optional.get(f"slot_{i}", DEFAULT_SLOTS[i - 1])
            prepared = _prepared(i, image, optional.get(f"mask_{i}"), width, height)
            images.append(prepared)
            slots.extend([slot] * prepared.shape[0])
        pixels = torch.cat(images, dim=0)
        if pixels.shape[0] > 16:
            raise glue.NodeError(NODE, f"{pixels.shape[0]} garments given; at most 16 are supported in one set")
        latents = vae.encode(pixels)
        return io.NodeOutput(encode(garments_net, latents, slots, clip, clip_vision, pixels), pixels)


def _prepared(i: int, image: torch.Tensor, mask, width: int, height: int) -> torch.Tensor:
    """Garment i checked (size, border), composited over white where its mask is transparent, fitted and padded."""
    if image.dim() == 4:
        if 0 < min(image.shape[1:3]) < MIN_SIDE:
            raise glue.NodeError(NODE, f"image_{i} is {image.shape[2]}x{image.shape[1]} pixels; a garment image needs "
                                       f"at least {MIN_SIDE} pixels on each side (it is scaled to {width}x{height} "
                                       f"and would encode as a blur): load a larger photo of garment {i}")
        for note in image_warnings(image):
            glue.warn(f"Encode Garments: image_{i} {note}")
    if max(image.shape[1:3]) > MAX_SIDE:
        glue.warn(f"Encode Garments: image_{i} is {image.shape[2]}x{image.shape[1]}; it is downscaled to at most "
                  f"{MAX_SIDE} pixels a side before fitting it to {width}x{height}")
    if mask is None and image.dim() == 4 and image.shape[-1] == 3 and min(image.shape[1:3]) > 0 \
            and border_darkness(image) > 0.8:
        glue.warn(f"Encode Garments: the border of image_{i} is mostly black; if it is a cut-out with transparency, "
                  f"connect Load Image's MASK output to mask_{i} so the background becomes white")
    try:
        return prepare_garment(image, height, width, mask)
    except ValueError as e:
        if "mask" in str(e):
            raise glue.NodeError(NODE, f"mask_{i}: {e}; connect the MASK of the Load Image that loads image_{i}") \
                from None
        raise glue.NodeError(NODE, f"image_{i}: {e}; connect an RGB IMAGE") from None
