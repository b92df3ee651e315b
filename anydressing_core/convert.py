"""Convert a garment model file to the AnyDressing-native .safetensors (fp16 by default).

    python -m anydressing_core.convert garment_extractor.safetensors --extra ip_layer.pth -o magicclothing_stable.safetensors
    python -m anydressing_core.convert magic_clothing_768_vitonhd_joint.safetensors -o magicclothing_768.safetensors

Pickled inputs are opened with torch.load(weights_only=True). A pickle that needs code to load is refused unless
--trust-pickle-code is given: use it only on a file from a source you trust, since unpickling can run code.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

import torch

from .formats import contents_from, read_tensors
from .layers import path_from_key
from .native_format import FormatError, NativeContents, write_native


# The README's model-table words for each way garments enter the MODEL (metadata 'injection').
MODE_WORDS = {
    "dressing": "additive Dressing-Attention (eq. 6)",
    "concat": "MagicClothing concat (garment tokens joined to the latent tokens)",
    "separate": "DreamFit separate (each garment attended separately and summed)",
}


def _read(path: str, trust_pickle_code: bool):
    if trust_pickle_code and path.lower().endswith((".pt", ".pth", ".ckpt", ".bin")):
        from .formats import _flatten

        obj = torch.load(path, map_location="cpu", weights_only=False)  # explicit user opt-in, in a command
        return _flatten(obj, os.path.basename(path)), {}
    return read_tensors(path)


def convert(inputs: list[str], output: str, dtype: torch.dtype = torch.float16, trust_pickle_code: bool = False,
            extra: Optional[str] = None) -> NativeContents:
    tensors, metadata = _read(inputs[0], trust_pickle_code)
    contents = contents_from(tensors, metadata, os.path.basename(inputs[0]))
    if extra:
        t2, m2 = _read(extra, trust_pickle_code)
        more = contents_from(t2, m2, os.path.basename(extra))
        contents.dressing.update(more.dressing)
        contents.metadata["injection"] = "dressing"
    cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
    unet = {k: cast(v) for k, v in contents.unet.items()}
    loras = {slot: {path_from_key(key): {p: (cast(l.down), cast(l.up), l.scale * l.rank) for p, l in projs.items()}
                    for key, projs in layers.items()} for slot, layers in contents.loras.items()}
    dressing = {path_from_key(key): (cast(d["k"]), cast(d["v"])) for key, d in contents.dressing.items()}
    meta = {k: str(v) for k, v in contents.metadata.items()
            if k in ("injection", "source_format", "text_context", "uncond", "layers")}
    if contents.metadata.get("injection") == "concat":
        meta.setdefault("text_context", "1")
    meta["converted_from"] = ", ".join(os.path.basename(p) for p in inputs + ([extra] if extra else []))
    image_proj = {k: cast(v) for k, v in contents.image_proj.items()}
    write_native(output, unet=unet, loras=loras, dressing=dressing, extra_metadata=meta, image_proj=image_proj)
    return contents


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m anydressing_core.convert", description=__doc__.splitlines()[0])
    ap.add_argument("input", help="the garment model file (.safetensors, .pt, .pth, .ckpt, .bin)")
    ap.add_argument("--extra", help="a second file with Dressing-Attention weights (e.g. MagicClothing ip_layer.pth)")
    ap.add_argument("-o", "--output", required=True, help="the .safetensors to write")
    ap.add_argument("--fp32", action="store_true", help="keep float32 (default: float16)")
    ap.add_argument("--trust-pickle-code", action="store_true",
                    help="allow a pickle that needs code to load (only for files from a source you trust)")
    args = ap.parse_args(argv)
    try:
        contents = convert([args.input], args.output, None if args.fp32 else torch.float16, args.trust_pickle_code,
                           args.extra)
    except FormatError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    injection = contents.metadata.get("injection", "dressing")
    print(f"wrote {args.output}: {len(contents.unet)} UNet tensors, {len(contents.loras)} LoRA slot(s), "
          f"{len(contents.dressing)} Dressing-Attention layer(s); garments enter the MODEL as "
          f"{MODE_WORDS.get(injection, injection)}"
          + (f"; image resampler ({len(contents.image_proj)} tensors)" if contents.image_proj else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
