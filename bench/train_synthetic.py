"""The "does it learn" run of the training issue at any length, on the CPU or a GPU: the synthetic dataset (striped
garments composited into known regions of a simple figure), an SD1.5-architecture UNet with random weights, and the
figures before and after training (diffusion and localization losses, each garment's attention mass inside and
outside its mask), plus seconds per step and peak memory.

CPU (what the test does, longer):
    python bench/train_synthetic.py --channels 32 --steps 200
GPU (full SD1.5 width, bf16, checkpointing; the pinned ComfyUI in the git-ignored .comfyui/, carried):
    python bench/train_synthetic.py --channels 320 --size 256 --steps 2000 --mixed-precision bf16 \\
        --gradient-checkpointing
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "fixture_pack"))
sys.path.insert(0, str(REPO / "bench"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--comfyui", help="ComfyUI folder (default: $COMFYUI_PATH, else the tests' pinned host)")
    ap.add_argument("--channels", type=int, default=32, help="UNet width (320 = SD1.5)")
    ap.add_argument("--size", type=int, default=64, help="image side of the synthetic samples")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--lambda-loc", type=float, default=10.0)
    ap.add_argument("--mixed-precision", default="no")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--cpu", action="store_true")
    args = ap.parse_args()

    from anydressing_train.__main__ import boot
    from dressing_bench import default_comfyui

    boot(Path(args.comfyui or default_comfyui()), ["--cpu"] if args.cpu else [])
    import torch

    import adtest_tiny
    import comfy.model_management as mm
    from anydressing_train.data import FolderDataset, make_synthetic
    from anydressing_train.engine import half_dtype, make_engine
    from anydressing_train.loop import evaluate, train
    from anydressing_train.trainer import DressingTrainer

    device = mm.get_torch_device()
    engine = make_engine(args.mixed_precision, device=device, cpu=device.type == "cpu", use_accelerate=False)
    root = tempfile.mkdtemp(prefix="anydressing-synthetic-")
    make_synthetic(root, count=args.samples, size=args.size)
    ds = FolderDataset(root)
    unet = adtest_tiny.tiny_model_patcher(0, model_channels=args.channels).model.diffusion_model.to(device)
    if half_dtype(args.mixed_precision) is not None:
        unet = unet.to(half_dtype(args.mixed_precision))
    vae = adtest_tiny.tiny_vae(0)
    context = torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(5)).to(device)

    def encode_image(x):
        with torch.no_grad():
            return (vae.encode(x) * 0.18215).to(device)

    tr = DressingTrainer(unet, ["upper", "lower"], rank=4, alpha=4.0,
                         gradient_checkpointing=args.gradient_checkpointing).to(device)
    with engine.autocast():
        before = evaluate(tr, ds, encode_image, lambda c: context, timesteps=(200, 500, 800), limit=8)
    import peak_memory

    peak_memory.reset(device)
    start = time.perf_counter()
    history = train(tr, ds, encode_image, lambda c: context, steps=args.steps, lr=args.lr,
                    lambda_loc=args.lambda_loc, dropout=0.0, engine=engine)
    seconds = (time.perf_counter() - start) / max(1, args.steps)
    peak = peak_memory.peak_mib(device)
    with engine.autocast():
        after = evaluate(tr, ds, encode_image, lambda c: context, timesteps=(200, 500, 800), limit=8)
    print(f"device {device} channels {args.channels} size {args.size} steps {args.steps} "
          f"precision {args.mixed_precision} checkpointing {args.gradient_checkpointing}")
    print(f"{'':14}{'diffusion':>11}{'localization':>14}{'mass inside':>13}{'mass outside':>14}")
    for name, e in (("before", before), ("after", after)):
        print(f"{name:14}{e['diffusion']:11.4f}{e['localization']:14.4f}{e['mass_inside']:13.4f}"
              f"{e['mass_outside']:14.4f}")
    first, last = history[0], history[-1]
    print(f"training loss: first step {first['total']:.4f}, last step {last['total']:.4f}; "
          f"{seconds:.3f} s/step; peak memory {peak_memory.kind(device)} {peak:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
