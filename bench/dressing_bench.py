"""Dressing cost against plain sampling, through ComfyUI's real SD1.5 model and sampling path.

For each size, garment count N and rows per UNet call (2 = one image with CFG, 8 = four images), with the same
random weights: plain vs dressed (unmasked and masked) sampling, timed alternately, median of per-pair ratios; the
one-off Encode Garments; the prototype's alternative (re-running a garment UNet at every step); peak memory; the
feature bank size per garment. Prints a table.

GPU (real sizes, fp16; the pinned ComfyUI the tests extract into the git-ignored .comfyui/, carried):
    python bench/dressing_bench.py --dtype float16 --sizes 512x384,768x576,1024x768 \\
        --garments 1,2,4,6 --rows 2,8 --steps 30
CPU smoke run (small model):
    python bench/dressing_bench.py --channels 64 --sizes 256x192 --garments 1,2 --rows 2 --steps 4 --repeats 2
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.append(str(REPO / "tests"))  # host: finding the pinned ComfyUI, scratch folders
import host  # noqa: E402
import peak_memory  # noqa: E402


def default_comfyui() -> str:
    """$COMFYUI_PATH, else the tests' host (the pinned ComfyUI in .comfyui/, extracted from ../shared/host if needed)."""
    if os.environ.get("COMFYUI_PATH"):
        return os.environ["COMFYUI_PATH"]
    found = host.find_comfyui()
    if found is None:
        raise SystemExit(f"pass --comfyui PATH: {host.why_no_host()}")
    return str(found)


def boot(comfyui: Path, cpu: bool, flags: list[str] = ()):
    sys.path.insert(0, str(comfyui))
    base = host.scratch_dir("anydressing-bench-")  # removed on exit (ANYDRESSING_KEEP_TMP=1 keeps it)
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "ComfyUI-AnyDressing").symlink_to(REPO, target_is_directory=True)
    saved = sys.argv
    sys.argv = ["main.py", "--base-directory", str(base), "--database-url", "sqlite:///:memory:"] + (
        ["--cpu", "--use-pytorch-cross-attention"] if cpu else []) + [f for f in flags if f not in ("--cpu",)]
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        import comfy.cli_args  # noqa: F401
    finally:
        sys.argv = saved
    import utils.extra_config  # noqa: F401
    import nodes

    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
    pack = os.path.join(str(base / "custom_nodes"), "ComfyUI-AnyDressing").replace(".", "_x_")
    return {name: sys.modules[f"{pack}.nodes.{name}"]
            for name in ("apply_dressing_attention", "encode_garments", "load_garments_net")}


def sd15_model(channels: int, dtype, seed: int = 0):
    import torch

    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    cfg = {"use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
           "adm_in_channels": None, "in_channels": 4, "out_channels": 4, "model_channels": channels,
           "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
           "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "channel_mult": [1, 2, 4, 4],
           "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": 768,
           "use_temporal_resblock": False, "use_temporal_attention": False, "num_heads": 8, "num_head_channels": -1}
    model_config = comfy.supported_models.SD15(cfg)
    model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model({}, "")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.diffusion_model.named_parameters(), key=lambda kv: kv[0]):
            if p.dim() >= 2:
                p.copy_((torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5).to(p.dtype))
            else:
                p.copy_((torch.ones(p.shape) if name.endswith("weight") else torch.zeros(p.shape)).to(p.dtype))
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


class Meter:
    """Synchronised timing and per-case peak memory (bench/peak_memory.py) on the benchmark's device."""

    def __init__(self, device):
        import torch

        self.torch, self.device = torch, device

    def sync(self):
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def reset(self):
        peak_memory.reset(self.device)

    def peak_mb(self) -> float:
        return peak_memory.peak_mib(self.device)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--comfyui", help="ComfyUI folder (default: $COMFYUI_PATH, else the tests' pinned host)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--channels", type=int, default=320, help="model_channels (320 = real SD1.5)")
    ap.add_argument("--sizes", default="768x576", help="image HxW list, e.g. 512x384,768x576,1024x768")
    ap.add_argument("--garments", default="1,2,4")
    ap.add_argument("--rows", default="2,8", help="UNet rows per call: 2 = one image with CFG, 8 = four images")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3, help="alternating plain/dressed pairs per case")
    ap.add_argument("--no-rerun-baseline", action="store_true", help="skip re-running a garment UNet per step")
    args = ap.parse_args(argv)

    import torch

    cpu = not torch.cuda.is_available()
    mods = boot(Path(args.comfyui or default_comfyui()), cpu)
    import comfy.model_management as mm
    import comfy.sample

    dtype = getattr(torch, args.dtype)
    device = mm.get_torch_device()
    meter = Meter(device)
    model = sd15_model(args.channels, dtype)
    gnet = mods["load_garments_net"].load("training-free", None, model)
    print(f"device {torch.cuda.get_device_name() if not cpu else 'cpu'}, {args.dtype}, model_channels "
          f"{args.channels}, {args.steps} steps, euler, cfg 6; median of {args.repeats} alternating pairs")
    header = (f"{'size':>9} {'rows':>4} {'N':>2} {'plain s':>8} {'dressed/plain':>13} {'masked/plain':>12} "
              f"{'masked/unmasked':>15} {'+encode/plain':>13} {'rerun/plain':>11} {'encode s':>8} "
              f"{'bank MB/garment':>15} {'peak MB plain':>13} {'peak MB dressed':>15}")
    print(header)
    g = torch.Generator().manual_seed(1)
    for size in args.sizes.split(","):
        h, w = (int(v) for v in size.split("x"))
        for rows in (int(r) for r in args.rows.split(",")):
            images = max(1, rows // 2)
            latent = torch.zeros(images, 4, h // 8, w // 8)
            cond = [[torch.randn(1, 77, 768, generator=g), {}]]
            neg = [[torch.randn(1, 77, 768, generator=g), {}]]
            noise = torch.randn(latent.shape, generator=g)

            def sample(m, steps=args.steps):
                meter.sync()
                t = time.perf_counter()
                comfy.sample.sample(m, noise, steps, 6.0, "euler", "normal", cond, neg, latent, denoise=1.0,
                                    disable_pbar=True, seed=0)
                meter.sync()
                return time.perf_counter() - t

            for n in (int(v) for v in args.garments.split(",")):
                gl = torch.randn(n, 4, h // 8, w // 8, generator=g)
                meter.sync()
                t0 = time.perf_counter()
                feats = mods["encode_garments"].encode(gnet, gl, ["upper"] * n)
                meter.sync()
                t_encode = time.perf_counter() - t0
                bank = feats.nbytes_per_garment() / 2**20
                dressed = mods["apply_dressing_attention"].apply(model, feats, 0.7, "", 0.0, 1.0, "auto", None)
                masks = torch.zeros(n, h, w)
                for k in range(n):
                    masks[k, k * h // n:(k + 1) * h // n] = 1.0
                masked = mods["apply_dressing_attention"].apply(model, feats, 0.7, "", 0.0, 1.0, "auto", masks)
                sample(model, 1), sample(dressed, 1), sample(masked, 1)  # warm-up and loads
                r_d, r_m, r_mu, plain_t = [], [], [], []
                for _ in range(args.repeats):  # each peak is its own run's: reset right before it
                    meter.reset()
                    tp = sample(model)
                    peak_plain = meter.peak_mb()
                    meter.reset()
                    td = sample(dressed)
                    peak_dressed = meter.peak_mb()
                    tm = sample(masked)
                    plain_t.append(tp)
                    r_d.append(td / tp)
                    r_m.append(tm / tp)
                    r_mu.append(tm / td)
                tp = statistics.median(plain_t)
                rerun = float("nan")
                if not args.no_rerun_baseline:
                    # the prototype's alternative: the garment UNet runs again at every step
                    per_step_encode = []
                    for _ in range(2):
                        meter.sync()
                        t0 = time.perf_counter()
                        mods["encode_garments"].encode(gnet, gl, ["upper"] * n)
                        meter.sync()
                        per_step_encode.append(time.perf_counter() - t0)
                    rerun = (statistics.median(r_d) * tp + args.steps * statistics.median(per_step_encode)) / tp
                print(f"{size:>9} {rows:>4} {n:>2} {tp:>8.2f} {statistics.median(r_d):>13.3f} "
                      f"{statistics.median(r_m):>12.3f} {statistics.median(r_mu):>15.3f} "
                      f"{(statistics.median(r_d) * tp + t_encode) / tp:>13.3f} {rerun:>11.3f} {t_encode:>8.3f} "
                      f"{bank:>15.1f} {peak_plain:>13.0f} {peak_dressed:>15.0f}", flush=True)
                del feats, dressed, masked
                mm.soft_empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
