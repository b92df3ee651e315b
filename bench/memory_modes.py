"""One dressed sampling run in the memory mode given by ComfyUI flags; prints peak memory and saves the latent.

    python bench/memory_modes.py --out /tmp/normal.pt -- --lowvram        # flags after -- go to ComfyUI
    python bench/memory_modes.py --compare /tmp/normal.pt /tmp/lowvram.pt /tmp/novram.pt

Same random weights and inputs in every mode (seeded), so the saved latents must agree within dtype tolerance.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dressing_bench  # noqa: E402
import peak_memory  # noqa: E402


def compare(paths: list[str]) -> int:
    import torch

    ref = torch.load(paths[0], weights_only=True)
    scale = float(ref.abs().max())
    for p in paths[1:]:
        other = torch.load(p, weights_only=True)
        print(f"{Path(p).name}: max |diff| relative to {Path(paths[0]).name}: "
              f"{float((other - ref).abs().max()) / scale:.2e}")
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    flags = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--comfyui", help="ComfyUI folder (default: $COMFYUI_PATH, else the tests' pinned host)")
    ap.add_argument("--out")
    ap.add_argument("--compare", nargs="+")
    ap.add_argument("--channels", type=int, default=320)
    ap.add_argument("--size", default="768x576")
    ap.add_argument("--garments", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--plain", action="store_true", help="sample the unpatched model (the reference peak)")
    args = ap.parse_args(argv)
    if args.compare:
        return compare(args.compare)

    import torch

    mods = dressing_bench.boot(Path(args.comfyui or dressing_bench.default_comfyui()), cpu="--cpu" in flags, flags=flags)
    import comfy.model_management as mm
    import comfy.sample

    h, w = (int(v) for v in args.size.split("x"))
    g = torch.Generator().manual_seed(0)
    model = dressing_bench.sd15_model(args.channels, getattr(torch, args.dtype))
    garment_latents = torch.randn(args.garments, 4, h // 8, w // 8, generator=g)  # drawn in both: same noise after
    dressed = model
    if not args.plain:  # the plain reference holds no garment features while it samples
        gnet = mods["load_garments_net"].load("training-free", None, model)
        feats = mods["encode_garments"].encode(gnet, garment_latents, ["upper"] * args.garments)
        mm.unload_all_models()  # GarmentsNet offloaded between encode and sampling, as between runs
        dressed = mods["apply_dressing_attention"].apply(model, feats, 0.7, "", 0.0, 1.0, "auto", None)
    latent = torch.zeros(1, 4, h // 8, w // 8)
    cond = [[torch.randn(1, 77, 768, generator=g), {}]]
    neg = [[torch.randn(1, 77, 768, generator=g), {}]]
    noise = torch.randn(latent.shape, generator=g)
    device = mm.get_torch_device()
    peak_memory.reset(device)
    t = time.perf_counter()
    out = comfy.sample.sample(dressed, noise, args.steps, 6.0, "euler", "normal", cond, neg, latent, denoise=1.0,
                              disable_pbar=True, seed=0)
    elapsed = time.perf_counter() - t
    peak = peak_memory.peak_mib(device)
    what = "plain (no garments)" if args.plain else f"{args.garments} garments"
    print(f"mode {' '.join(flags) or 'default'}: {args.size}, {what}, {args.steps} steps in "
          f"{elapsed:.2f} s, peak {peak_memory.kind(device)} {peak:.0f} MiB, vram state {mm.vram_state.name}",
          flush=True)
    if args.out:
        torch.save(out.float().cpu(), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
