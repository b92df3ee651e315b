"""Run GarmentsNet once at t=0 over all garments in one batched pass and keep the GARMENT_FEATURES."""

from __future__ import annotations

import torch

from ..anydressing_core.encoder import (TAP_INPUT, TAP_OUTPUT, GarmentEncodeHooks, zero_cross_attention_output,
                                        zero_cross_attention_replace)
from ..anydressing_core.features import GarmentFeatures
from ..anydressing_core.formats import TRAINING_FREE_STRENGTH
from ..anydressing_core.layers import format_key
from . import glue
from .garments_net import GarmentsNet

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
