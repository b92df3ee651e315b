"""Garment model files users already have, detected from their keys (never from the file name).

Every file becomes NativeContents, the same structure the AnyDressing-native format parses to, plus how its
garments enter the MODEL (`injection`): "dressing" (additive Dressing-Attention, eq. 6) or "concat" (MagicClothing:
garment tokens joined to the latent tokens before the block's own projections).

Pickled files (.pt/.pth/.ckpt/.bin) are opened only with torch.load(weights_only=True): nothing in a model file is
ever executed.
"""

from __future__ import annotations

import os
import re
from typing import Optional

import torch

from .layers import LayerKey
from .native_format import DRESSING_KEY, FormatError, NativeContents, is_native, parse_native

PICKLE_EXTENSIONS = (".pt", ".pth", ".ckpt", ".bin")
_DIFFUSERS = re.compile(r"^(down_blocks|mid_block|up_blocks|conv_in|conv_out|conv_norm_out|time_embedding)\.")
_LDM = re.compile(r"^(input_blocks|middle_block|output_blocks|time_embed|out)\.")
_IP_LAYER = re.compile(r"^(\d+)\.to_([kv])_ip\.weight$")
_ADAPTER = re.compile(r"^adapter_modules\.(\d+)\.to_([kv])_ref\.weight$")

# SD1.5 attn1 layers in the order of diffusers' attn_processors (down, up, then mid); processor 2*i is attn1 of the
# i-th entry (odd indices are attn2). IP-Adapter-style ModuleList checkpoints (ip_layer.pth) use this order.
DIFFUSERS_ATTN1_ORDER: tuple[LayerKey, ...] = (
    ("input", 1, 0), ("input", 2, 0), ("input", 4, 0), ("input", 5, 0), ("input", 7, 0), ("input", 8, 0),
    ("output", 3, 0), ("output", 4, 0), ("output", 5, 0), ("output", 6, 0), ("output", 7, 0), ("output", 8, 0),
    ("output", 9, 0), ("output", 10, 0), ("output", 11, 0), ("middle", 0, 0),
)

KNOWN = ("AnyDressing-native .safetensors (metadata anydressing_format)",
         "SD1.5 UNet in ComfyUI/ldm naming (input_blocks..., optionally model.diffusion_model.-prefixed, or a whole "
         "ComfyUI checkpoint)",
         "SD1.5 UNet in diffusers naming with no prefix (MagicClothing garment UNet: down_blocks...)",
         "MagicClothing 'stable' ip_layer.pth (<idx>.to_k_ip.weight / to_v_ip.weight)")


def _first(keys, n: int = 6) -> str:
    keys = list(keys)
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} keys)" if len(keys) > n else f" ({len(keys)} keys)")


def read_tensors(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a .safetensors or a weights-only pickle. Raises FormatError."""
    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise FormatError(f"file not found: {path}")
    if path.lower().endswith(PICKLE_EXTENSIONS):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            text = str(e)
            if "Unsupported global" in text or "allowed global" in text or "safe_globals" in text:
                raise FormatError(f"{name} is a pickle that needs code to load, and this pack never runs code from "
                                  f"a model file. If you trust its source, convert it once to .safetensors: "
                                  f"python -m anydressing_core.convert {name} --trust-pickle-code -o "
                                  f"{os.path.splitext(name)[0]}.safetensors (run in custom_nodes/ComfyUI-AnyDressing)"
                                  ) from None
            detail = text.split("WeightsUnpickler error:")[-1].strip().splitlines()[0] if text else type(e).__name__
            raise FormatError(f"{name} is not a readable checkpoint ({detail}); re-download it") from None
        return _flatten(obj, name), {}
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            return {k: f.get_tensor(k) for k in f.keys()}, metadata
    except Exception as e:
        raise FormatError(f"{name} is not a readable .safetensors file ({type(e).__name__}: {e}); re-download or "
                          f"re-convert it") from None


def _flatten(obj, name: str) -> dict[str, torch.Tensor]:
    """Unwrap the usual containers ({'state_dict': ...}, {'module': ...}) to a flat name -> tensor dict."""
    for wrapper in ("state_dict", "module", "model"):
        if isinstance(obj, dict) and wrapper in obj and isinstance(obj[wrapper], dict) and len(obj) <= 4:
            obj = obj[wrapper]
    if not isinstance(obj, dict):
        raise FormatError(f"{name} holds a {type(obj).__name__}, not a dict of tensors")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise FormatError(f"{name} holds no tensors")
    return tensors


def detect(tensors: dict[str, torch.Tensor], metadata: Optional[dict]) -> str:
    """'native', 'ldm_unet', 'diffusers_unet', 'ip_layer', 'imagdressing', 'dreamfit' or 'unknown'."""
    keys = list(tensors)
    if is_native(metadata, keys):
        return "native"
    if any(k.startswith("ref_unet.") for k in keys) and any(k.startswith("adapter_modules.") for k in keys):
        return "imagdressing"
    if any(k.startswith("target_unet.") for k in keys):
        return "dreamfit"
    if keys and all(_IP_LAYER.match(k) for k in keys):
        return "ip_layer"
    if any(_LDM.match(k) or k.startswith("model.diffusion_model.") for k in keys):
        return "ldm_unet"
    if any(_DIFFUSERS.match(k) for k in keys):
        return "diffusers_unet"
    return "unknown"


def ip_layer_weights(tensors: dict[str, torch.Tensor], name: str) -> dict[LayerKey, dict[str, torch.Tensor]]:
    """MagicClothing 'stable' ip_layer.pth: <2*i>.to_{k,v}_ip.weight -> W_k'/W_v' of the i-th attn1 layer."""
    out: dict[LayerKey, dict[str, torch.Tensor]] = {}
    for k, t in tensors.items():
        m = _IP_LAYER.match(k)
        idx = int(m.group(1))
        if idx % 2 or idx // 2 >= len(DIFFUSERS_ATTN1_ORDER):
            raise FormatError(f"{name}: {k} is not an SD1.5 attn1 processor index (even 0..30); an AnimateDiff "
                              f"variant with shifted indices is not supported")
        out.setdefault(DIFFUSERS_ATTN1_ORDER[idx // 2], {})[m.group(2)] = t
    missing = [key for key, d in out.items() if set(d) != {"k", "v"}]
    if missing:
        raise FormatError(f"{name}: layers {missing} lack to_k_ip or to_v_ip")
    return out


def _processor_weights(found: dict[int, dict[str, torch.Tensor]], name: str) -> dict[LayerKey, dict[str, torch.Tensor]]:
    out: dict[LayerKey, dict[str, torch.Tensor]] = {}
    for idx, d in found.items():
        if idx % 2 or idx // 2 >= len(DIFFUSERS_ATTN1_ORDER):
            raise FormatError(f"{name}: attention processor {idx} is not an SD1.5 attn1 index (even 0..30)")
        if set(d) != {"k", "v"}:
            raise FormatError(f"{name}: attention processor {idx} lacks its to_k or to_v weight")
        out[DIFFUSERS_ATTN1_ORDER[idx // 2]] = d
    return out


def imagdressing_contents(tensors: dict[str, torch.Tensor], name: str) -> NativeContents:
    """IMAGDressing-v1: ref_unet.* (diffusers) is GarmentsNet, adapter_modules.<idx>.to_{k,v}_ref are W_k'/W_v',
    proj.* is the resampler that makes its cross-attention context from CLIP ViT-H image features."""
    unet = {k[len("ref_unet."):]: v for k, v in tensors.items() if k.startswith("ref_unet.")}
    proj = {k[len("proj."):]: v for k, v in tensors.items() if k.startswith("proj.")}
    found: dict[int, dict[str, torch.Tensor]] = {}
    for k, t in tensors.items():
        m = _ADAPTER.match(k)
        if m:
            found.setdefault(int(m.group(1)), {})[m.group(2)] = t
    if not proj:
        raise FormatError(f"{name}: IMAGDressing-v1 file without its proj.* resampler weights")
    return NativeContents(unet=unet, unet_naming="diffusers", dressing=_processor_weights(found, name),
                          image_proj=proj, metadata={"injection": "dressing", "source_format": "imagdressing"})


_DREAMFIT_LORA = re.compile(r"^(.*)\.(?:(to_q|to_k|to_v|to_out)_lora|lora_layer)\.(down|up)\.weight$")


def dreamfit_contents(tensors: dict[str, torch.Tensor], name: str, scale: float = 8.0 / 64.0) -> NativeContents:
    """DreamFit SD1.5: target_unet.<ldm key>; its LoRA (rank 64, alpha 8) is merged into the encoder weights;
    attn1.ref_to_{k,v} (mid and output blocks) are W_k'/W_v'; references are attended separately and summed, and
    both CFG halves see the garments."""
    from .layers import key_from_path

    sd = {k[len("target_unet."):]: v for k, v in tensors.items() if k.startswith("target_unet.")}
    unet, loras, dressing = {}, {}, {}
    for k, t in sd.items():
        m = _DREAMFIT_LORA.match(k)
        if m:
            base, proj, part = m.groups()
            target = f"{base}.{proj}.weight" if proj else f"{base}.weight"
            if proj == "to_out":
                target = f"{base}.to_out.0.weight"
            loras.setdefault(target, {})[part] = t
            continue
        m = re.match(r"^(.*)\.attn1\.ref_to_([kv])\.weight$", k)
        if m:
            dressing.setdefault(key_from_path(m.group(1)), {})[m.group(2)] = t
            continue
        unet[k] = t
    for target, parts in loras.items():
        if target not in unet or set(parts) != {"down", "up"}:
            raise FormatError(f"{name}: LoRA for {target} has no base weight or lacks down/up")
        down, up, w = parts["down"].float(), parts["up"].float(), unet[target]
        if w.dim() == 4:  # conv LoRA: down [r, in, kh, kw], up [out, r, 1, 1]
            delta = torch.einsum("or,rihw->oihw", up.flatten(1), down)
        else:
            delta = up.flatten(1) @ down.flatten(1)
        unet[target] = (w.float() + scale * delta.reshape(w.shape)).to(w.dtype)
    bad = [key for key, d in dressing.items() if set(d) != {"k", "v"}]
    if bad:
        raise FormatError(f"{name}: layers {bad} lack ref_to_k or ref_to_v")
    return NativeContents(unet=unet, unet_naming="ldm", dressing=dressing,
                          metadata={"injection": "separate", "source_format": "dreamfit", "text_context": "1",
                                    "uncond": "1", "layers": "dressing"})


def contents_from(tensors: dict[str, torch.Tensor], metadata: Optional[dict], name: str) -> NativeContents:
    """Any supported layout -> NativeContents (with metadata['injection'] set)."""
    kind = detect(tensors, metadata)
    if kind == "native":
        c = parse_native(tensors, metadata, name)
        c.metadata.setdefault("injection", "dressing")
        return c
    bad = [k for k, t in tensors.items() if not t.is_floating_point() or not bool(torch.isfinite(t).all())]
    if bad:
        raise FormatError(f"{name}: non-float, NaN or infinite values in {_first(bad)}; the file is damaged")
    if kind == "ldm_unet":
        prefix = "model.diffusion_model."
        if any(k.startswith(prefix) for k in tensors):  # a ComfyUI checkpoint: keep the UNet only
            unet = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        else:
            unet = {k: v for k, v in tensors.items() if _LDM.match(k)}
        return NativeContents(unet=unet, unet_naming="ldm", metadata={"injection": "dressing", "source_format": kind})
    if kind == "diffusers_unet":
        unet = {k: v for k, v in tensors.items() if _DIFFUSERS.match(k)}
        return NativeContents(unet=unet, unet_naming="diffusers",  # MagicClothing ran it with the empty prompt
                              metadata={"injection": "concat", "source_format": "magicclothing", "text_context": "1"})
    if kind == "ip_layer":
        dressing = ip_layer_weights(tensors, name)
        return NativeContents(dressing=dressing, metadata={"injection": "dressing", "source_format": kind})
    if kind == "imagdressing":
        return imagdressing_contents(tensors, name)
    if kind == "dreamfit":
        return dreamfit_contents(tensors, name)
    raise FormatError(f"{name}: unknown layout; first keys: {_first(tensors)}; known layouts: {'; '.join(KNOWN)}")


def load_contents(path: str, extra_path: Optional[str] = None) -> NativeContents:
    """Read a garment model file (and optionally a second file with Dressing-Attention weights, e.g. ip_layer.pth)."""
    tensors, metadata = read_tensors(path)
    contents = contents_from(tensors, metadata, os.path.basename(path))
    if extra_path:
        t2, m2 = read_tensors(extra_path)
        extra = contents_from(t2, m2, os.path.basename(extra_path))
        if extra.unet or extra.loras:
            raise FormatError(f"{os.path.basename(extra_path)} holds UNet or LoRA weights; the extra file may only "
                              f"hold Dressing-Attention weights (e.g. MagicClothing's ip_layer.pth)")
        contents.dressing.update(extra.dressing)
        contents.metadata["injection"] = "dressing"  # MagicClothing 'stable': extractor + additive ip layers
    return contents


def read_keys(path: str) -> tuple[list[str], dict[str, str]]:
    """The tensor names and metadata of a file without reading its tensors (pickles through a memory map).

    Raises FormatError for a file that cannot be opened that way (legacy pickles, damaged files).
    """
    name = os.path.basename(path)
    try:
        if path.lower().endswith(PICKLE_EXTENSIONS):
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            return list(_flatten(obj, name)), {}
        from safetensors import safe_open

        with safe_open(path, framework="pt", device="cpu") as f:
            return list(f.keys()), dict(f.metadata() or {})
    except FormatError:
        raise
    except Exception as e:
        raise FormatError(f"{name}: keys not readable ({type(e).__name__})") from None


def holds_only_dressing_weights(keys: list[str], metadata: Optional[dict]) -> bool:
    """A file fit for a second 'extra weights' file: W_k'/W_v' only (MagicClothing's ip_layer.pth, or a native file
    holding just dressing.* tensors), no UNet and no LoRA."""
    if not keys:
        return False
    if is_native(metadata, keys):
        return all(DRESSING_KEY.match(k) for k in keys)
    return all(_IP_LAYER.match(k) for k in keys)


TRAINING_FREE_STRENGTH = 0.7  # the paper's inference lambda (section 5.1)
# peer models whose attention processors add the garment branch unscaled (MagicClothing's concat and ip layers,
# IMAGDressing at its authors' scale 1.0, DreamFit's ref_scale 1.0): at any other lambda the result departs from theirs
UNSCALED_FORMATS = ("magicclothing", "ip_layer", "imagdressing", "dreamfit")


def inference_strength(contents: NativeContents, name: str = "file") -> float:
    """The Dressing-Attention lambda a file is meant to run at ('auto' on Apply Dressing-Attention): the strength it
    was trained at when its metadata records one; 1.0 for the peer formats (their processors have no scale) and for
    AnyDressing files trained before the strength was recorded (the trainer always used 1.0); 0.7 for plain UNets,
    which run like training-free mode with the paper's initialisation."""
    meta = contents.metadata
    if "strength" in meta:
        try:
            value = float(meta["strength"])
        except ValueError:
            raise FormatError(f"{name}: metadata strength {meta['strength']!r} is not a number") from None
        if not (value > 0 and value < float("inf")):
            raise FormatError(f"{name}: metadata strength {value} must be a finite number > 0")
        return value
    if meta.get("source_format") in UNSCALED_FORMATS:
        return 1.0
    if "anydressing_format" in meta and (contents.loras or contents.dressing):
        return 1.0
    return TRAINING_FREE_STRENGTH


def feature_tap(contents: NativeContents, name: str = "file") -> str:
    """Where GarmentsNet's features are taken (metadata feature_tap); files without it: the attn1 input."""
    from .encoder import FEATURE_TAPS, TAP_INPUT

    tap = contents.metadata.get("feature_tap", TAP_INPUT)
    if tap not in FEATURE_TAPS:
        raise FormatError(f"{name}: metadata feature_tap {tap!r} is not one of {', '.join(FEATURE_TAPS)}; "
                          f"update ComfyUI-AnyDressing")
    return tap
