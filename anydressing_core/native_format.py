"""The AnyDressing-native checkpoint format (version 1): one .safetensors file.

Metadata (all strings, as safetensors requires):
  anydressing_format  "1"                       required
  slots               JSON list, e.g. ["upper", "lower"]; the slots that have GFE LoRA in this file
  lora_alpha          optional default alpha for LoRA pairs without their own .alpha tensor (default: the rank)

Tensors, each group optional; what is absent falls back to the paper's initialisation:
  garments_net.<UNet key>        (a) GarmentsNet UNet weights in ldm/ComfyUI naming (input_blocks..., middle_block...,
                                     output_blocks..., time_embed..., out...) or diffusers naming (down_blocks...,
                                     mid_block..., up_blocks..., conv_in..., time_embedding...). Absent: the base
                                     MODEL's UNet.
  gfe.<slot>.<layer>.attn1.to_{q,k,v}.lora_down.weight [r, C]
  gfe.<slot>.<layer>.attn1.to_{q,k,v}.lora_up.weight   [C, r]
  gfe.<slot>.<layer>.attn1.to_{q,k,v}.alpha            scalar, optional
                                 (b) per-slot GFE LoRA; delta W = alpha / r * up @ down. Absent: no LoRA.
  dressing.<layer>.attn1.to_{k,v}.weight [C, C]
                                 (c) Dressing-Attention W_k' / W_v'. Absent: copies of the MODEL's W_k / W_v.
  image_proj.<resampler key>     (d) optional: a resampler that turns CLIP vision features into GarmentsNet's
                                     cross-attention context (IMAGDressing-v1); needs a CLIP_VISION in Encode Garments.

Optional metadata: injection ("dressing" additive, eq. 6 | "concat" MagicClothing | "separate": each garment
attended on its own and summed, DreamFit), text_context ("1": GarmentsNet runs with the empty prompt's embedding),
uncond ("1": the unconditional rows see the garments by default), feature_tap (where Encode Garments takes the
features: "attn1_input", the self-attention input after norm1, the default for files without it; "gfe_output", the
GFE self-attention output F^new of eq. 4-5), strength (the Dressing-Attention lambda the file was trained at; Apply
Dressing-Attention's auto strength uses it). Files written by the trainer also record lora_rank, lora_alpha,
garments_net, loc_reduction, lambda_loc, the base model and the step count.

<layer> is the ldm path of a transformer block, e.g. input_blocks.1.1.transformer_blocks.0,
middle_block.1.transformer_blocks.0, output_blocks.11.1.transformer_blocks.0.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Optional

import torch

from .layers import LayerKey, is_layer_path, key_from_path
from .lora import LoRA, SlotLoRAs
from .slots import SLOTS

FORMAT_VERSION = "1"
UNET_PREFIX = "garments_net."
GFE_PREFIX = "gfe."
DRESSING_PREFIX = "dressing."
IMAGE_PROJ_PREFIX = "image_proj."

_LDM_UNET = re.compile(r"^(input_blocks|middle_block|output_blocks|time_embed|out|label_emb)\.")
_DIFFUSERS_UNET = re.compile(r"^(down_blocks|mid_block|up_blocks|conv_in|conv_out|conv_norm_out|time_embedding)\.")
_GFE = re.compile(r"^gfe\.([A-Za-z0-9_]+)\.(.+)\.attn1\.to_([qkv])\.(lora_down\.weight|lora_up\.weight|alpha)$")
DRESSING_KEY = re.compile(r"^dressing\.(.+)\.attn1\.to_([kv])\.weight$")

KNOWN_LAYOUTS = (
    "garments_net.<ldm or diffusers UNet key>",
    "gfe.<slot>.<layer>.attn1.to_{q,k,v}.lora_{down,up}.weight (+ .alpha)",
    "dressing.<layer>.attn1.to_{k,v}.weight",
    "image_proj.<resampler key>",
)


class FormatError(ValueError):
    """A file that is not a valid AnyDressing-native checkpoint; the message says what was found."""


@dataclass
class NativeContents:
    unet: dict[str, torch.Tensor] = field(default_factory=dict)  # keys without the garments_net. prefix
    unet_naming: Optional[str] = None  # "ldm" | "diffusers" | None
    loras: SlotLoRAs = field(default_factory=dict)
    dressing: dict[LayerKey, dict[str, torch.Tensor]] = field(default_factory=dict)  # key -> {"k": W, "v": W}
    slots: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    image_proj: dict[str, torch.Tensor] = field(default_factory=dict)  # resampler weights, without the prefix


def _first_keys(keys, n: int = 8) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:n])
    return shown + (f", ... ({len(keys)} keys)" if len(keys) > n else f" ({len(keys)} keys)")


def is_native(metadata: Optional[dict], keys) -> bool:
    return bool(metadata and "anydressing_format" in metadata)


def parse_native(tensors: dict[str, torch.Tensor], metadata: Optional[dict], name: str = "file") -> NativeContents:
    """Validate and split the tensors of a native file. Raises FormatError with what was found."""
    metadata = dict(metadata or {})
    version = metadata.get("anydressing_format")
    if version is None:
        raise FormatError(f"{name} has no 'anydressing_format' metadata; first keys: {_first_keys(tensors)}; "
                          f"known layouts: {'; '.join(KNOWN_LAYOUTS)}")
    if version != FORMAT_VERSION:
        raise FormatError(f"{name} is AnyDressing format version {version!r}; this pack reads version "
                          f"{FORMAT_VERSION!r}. Update ComfyUI-AnyDressing.")
    try:
        slots = json.loads(metadata.get("slots", "[]"))
        assert isinstance(slots, list) and all(isinstance(s, str) for s in slots)
    except Exception:
        raise FormatError(f"{name}: metadata 'slots' must be a JSON list of slot names, got {metadata.get('slots')!r}")
    for s in slots:
        if s not in SLOTS:
            raise FormatError(f"{name}: metadata slot {s!r} is not one of {', '.join(SLOTS)}")
    default_alpha = metadata.get("lora_alpha")

    bad = [k for k, t in tensors.items() if not isinstance(t, torch.Tensor) or not t.is_floating_point()]
    if bad:
        raise FormatError(f"{name}: tensors must be floating point; not so: {_first_keys(bad)}")
    nonfinite = [k for k, t in tensors.items() if not bool(torch.isfinite(t).all())]
    if nonfinite:
        raise FormatError(f"{name} holds NaN or infinite values in {_first_keys(nonfinite)}; the file is damaged, "
                          f"download or convert it again")
    out = NativeContents(slots=slots, metadata=metadata)
    raw_lora: dict[tuple[str, LayerKey, str], dict[str, torch.Tensor]] = {}
    unknown = []
    for key, t in tensors.items():
        if key.startswith(UNET_PREFIX):
            k = key[len(UNET_PREFIX):]
            if k.startswith("model.diffusion_model."):
                k = k[len("model.diffusion_model."):]
            naming = "ldm" if _LDM_UNET.match(k) else "diffusers" if _DIFFUSERS_UNET.match(k) else None
            if naming is None:
                unknown.append(key)
                continue
            if out.unet_naming not in (None, naming):
                raise FormatError(f"{name} mixes ldm and diffusers GarmentsNet keys (e.g. {key})")
            out.unet_naming = naming
            out.unet[k] = t
            continue
        if key.startswith(IMAGE_PROJ_PREFIX):
            out.image_proj[key[len(IMAGE_PROJ_PREFIX):]] = t
            continue
        m = _GFE.match(key)
        if m:
            slot, path, proj, part = m.groups()
            if not is_layer_path(path):
                unknown.append(key)
                continue
            if slot not in slots:
                raise FormatError(f"{name}: LoRA key {key} uses slot {slot!r}, which metadata 'slots' {slots} "
                                  f"does not declare")
            raw_lora.setdefault((slot, key_from_path(path), proj), {})[part] = t
            continue
        m = DRESSING_KEY.match(key)
        if m:
            path, proj = m.groups()
            if not is_layer_path(path):
                unknown.append(key)
                continue
            if t.dim() != 2 or t.shape[0] != t.shape[1]:
                raise FormatError(f"{name}: {key} has shape {tuple(t.shape)}; W_k'/W_v' must be square [C, C]")
            out.dressing.setdefault(key_from_path(path), {})[proj] = t
            continue
        unknown.append(key)
    if unknown:
        raise FormatError(f"{name} has keys this format does not define: {_first_keys(unknown)}; "
                          f"known layouts: {'; '.join(KNOWN_LAYOUTS)}")

    for (slot, lkey, proj), parts in raw_lora.items():
        if "lora_down.weight" not in parts or "lora_up.weight" not in parts:
            raise FormatError(f"{name}: LoRA for slot {slot!r} layer {lkey} to_{proj} lacks lora_down or lora_up")
        down, up = parts["lora_down.weight"], parts["lora_up.weight"]
        if down.dim() != 2 or up.dim() != 2 or up.shape[1] != down.shape[0]:
            raise FormatError(f"{name}: LoRA for slot {slot!r} layer {lkey} to_{proj} has mismatched shapes "
                              f"down {tuple(down.shape)} / up {tuple(up.shape)}")
        rank = down.shape[0]
        if "alpha" in parts:
            if parts["alpha"].numel() != 1:
                raise FormatError(f"{name}: LoRA alpha for slot {slot!r} layer {lkey} to_{proj} must be one number")
            alpha = float(parts["alpha"].float().reshape(-1)[0])
        elif default_alpha is not None:
            try:
                alpha = float(default_alpha)
            except ValueError:
                raise FormatError(f"{name}: metadata lora_alpha {default_alpha!r} is not a number") from None
        else:
            alpha = float(rank)
        out.loras.setdefault(slot, {}).setdefault(lkey, {})[proj] = LoRA(down=down, up=up, scale=alpha / rank)
    for lkey, d in out.dressing.items():
        if set(d) != {"k", "v"}:
            raise FormatError(f"{name}: Dressing-Attention weights of layer {lkey} need both to_k and to_v")
    return out


def read_native(path: str) -> NativeContents:
    """Read a native file from disk (safetensors only; nothing in it is executed)."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise FormatError(f"file not found: {path}")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # truncated or corrupt
        raise FormatError(f"{os.path.basename(path)} is not a readable .safetensors file ({type(e).__name__}: {e}); "
                          f"re-download or re-convert it") from None
    return parse_native(tensors, metadata, os.path.basename(path))


def write_native(path: str, *, unet: Optional[dict[str, torch.Tensor]] = None,
                 loras: Optional[dict[str, dict[str, dict[str, tuple[torch.Tensor, torch.Tensor, float]]]]] = None,
                 dressing: Optional[dict[str, tuple[torch.Tensor, torch.Tensor]]] = None,
                 extra_metadata: Optional[dict[str, str]] = None,
                 image_proj: Optional[dict[str, torch.Tensor]] = None) -> None:
    """Write a native file.

    unet: UNet state dict (ldm or diffusers keys, unprefixed). loras: slot -> layer path -> proj -> (down, up, alpha).
    dressing: layer path -> (W_k', W_v').
    """
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for k, t in (unet or {}).items():
        tensors[UNET_PREFIX + k] = t
    for slot, layers in (loras or {}).items():
        for layer_path, projs in layers.items():
            for proj, (down, up, alpha) in projs.items():
                base = f"{GFE_PREFIX}{slot}.{layer_path}.attn1.to_{proj}"
                tensors[base + ".lora_down.weight"] = down
                tensors[base + ".lora_up.weight"] = up
                tensors[base + ".alpha"] = torch.tensor(float(alpha))
    for layer_path, (wk, wv) in (dressing or {}).items():
        tensors[f"{DRESSING_PREFIX}{layer_path}.attn1.to_k.weight"] = wk
        tensors[f"{DRESSING_PREFIX}{layer_path}.attn1.to_v.weight"] = wv
    for k, t in (image_proj or {}).items():
        tensors[IMAGE_PROJ_PREFIX + k] = t
    metadata = {"anydressing_format": FORMAT_VERSION, "slots": json.dumps(sorted((loras or {}).keys()))}
    metadata.update(extra_metadata or {})
    out, seen = {}, set()
    for k, v in tensors.items():  # safetensors refuses tensors that share memory (e.g. W' initialised as W)
        v = v.contiguous()
        ptr = v.untyped_storage().data_ptr()
        if ptr in seen:
            v = v.clone()
        seen.add(v.untyped_storage().data_ptr())
        out[k] = v
    save_file(out, path, metadata=metadata)
