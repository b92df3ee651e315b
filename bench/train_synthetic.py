"""The "does it learn" run of training, on held-out samples only, on the CPU or a GPU: a synthetic dataset (striped
garments composited into the image, by default each in a random box so that a garment's place says nothing about its
slot), an SD1.5-architecture UNet with random weights, and held-out figures (samples generated with another seed,
never trained on): the diffusion loss and each garment's attention mass inside and outside its mask, for the
pack's training-free mode and then every --eval-every steps of training; plus seconds per step and peak memory.

CPU (the README's table; add --mixed-precision bf16 for its bf16 rows, --feature-tap attn1_input for the other tap):
    python bench/train_synthetic.py --cpu
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


def pretrain_unet(unet, dataset, encode_image, context, steps: int, lr: float, seed: int) -> None:
    """Plain epsilon-prediction training of the whole UNet on person images (no garments): a stand-in for the
    pretraining a real SD1.5 UNet has, which a UNet with random weights lacks. Never on the bench's held-out set."""
    import torch

    from anydressing_train.trainer import ddpm_alphas_cumprod

    alphas = ddpm_alphas_cumprod()
    gen = torch.Generator().manual_seed(1000 + seed)
    latents = torch.cat([encode_image(dataset[i].person.unsqueeze(0)) for i in range(len(dataset))], dim=0)
    dev = latents.device
    unet.train().requires_grad_(True)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    first = last = None
    for step in range(steps):
        idx = torch.randint(0, latents.shape[0], (4,), generator=gen)
        x0 = latents[idx]
        t = torch.randint(0, 1000, (4,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen).to(dev)
        a = alphas[t].view(-1, 1, 1, 1).to(dev)
        eps = unet(a.sqrt() * x0 + (1 - a).sqrt() * noise, timesteps=t.float().to(dev),
                   context=context.expand(4, -1, -1))
        loss = torch.nn.functional.mse_loss(eps.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        value = float(loss.detach())
        first = value if first is None else first
        last = value if last is None else 0.95 * last + 0.05 * value
    unet.eval().requires_grad_(False)
    print(f"pretrained the UNet: {steps} steps, diffusion loss {first:.4f} at the first step, {last:.4f} "
          f"(moving average) at the last")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--comfyui", help="ComfyUI folder (default: $COMFYUI_PATH, else the tests' pinned host)")
    ap.add_argument("--channels", type=int, default=32, help="UNet width (320 = SD1.5)")
    ap.add_argument("--heads", type=int, default=8,
                    help="attention heads (SD1.5: 8, i.e. 40 channels per head at its width; at --channels 32, "
                         "2 heads give 16 per head)")
    ap.add_argument("--size", type=int, default=64, help="image side of the synthetic samples")
    ap.add_argument("--samples", type=int, default=32, help="training samples")
    ap.add_argument("--val-samples", type=int, default=8, help="held-out samples (another seed)")
    ap.add_argument("--layout", default="random", choices=("random", "halves", "fixed"))
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--lambda-loc", type=float, default=0.01)
    ap.add_argument("--lambda-tex", type=float, default=0.001, help="texture loss weight (edge term; 0: off)")
    # paper_scale: these 64 x 64 samples stand in for the paper's 768 x 576, where eq. 9's sum is 108 times larger
    ap.add_argument("--loc-reduction", default="paper_scale", choices=("sum", "paper_scale", "mean"))
    ap.add_argument("--feature-tap", default="gfe_output", choices=("gfe_output", "attn1_input"))
    ap.add_argument("--accumulation", type=int, default=1,
                    help="samples per optimizer step (gradient accumulation; the paper's batch is 4 per GPU on 8)")
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--mixed-precision", default="no")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log", help="CSV of the per-step losses and held-out figures")
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--pretrain-steps", type=int, default=0,
                    help="first train the random UNet as a plain diffusion model on other synthetic images (batch 4, "
                         "its own seed), so DressingNet's queries carry what an SD1.5 UNet's do about a pixel; 0: off")
    ap.add_argument("--pretrain-lr", type=float, default=1e-3)
    ap.add_argument("--by-resolution", action="store_true",
                    help="after training, the inside-mask share per layer resolution and timestep, on the first 8 "
                         "training samples and on the held-out ones (where localization is learned)")
    ap.add_argument("--latent-scale", default="auto",
                    help="factor on the toy VAE's latents: auto = 1 / their std on the training samples (how SD's "
                         "0.18215 was chosen for its VAE: unit-variance latents, so noise at t hides as much as it "
                         "does in SD1.5); or a number (0.18215: SD's factor, which on this random VAE leaves latents "
                         "of std 0.09 that noise drowns at every t)")
    args = ap.parse_args()

    from anydressing_train.__main__ import boot
    from dressing_bench import default_comfyui

    boot(Path(args.comfyui or default_comfyui()), ["--cpu"] if args.cpu else [])
    import torch

    import adtest_tiny
    import comfy.model_management as mm
    from anydressing_train.data import FolderDataset, make_synthetic
    from anydressing_train.engine import half_dtype, make_engine
    from anydressing_train.loop import EVAL_TIMESTEPS, evaluate, latent_std, train
    from anydressing_train.trainer import DressingTrainer

    torch.manual_seed(args.seed)
    device = mm.get_torch_device()
    engine = make_engine(args.mixed_precision, device=device, cpu=device.type == "cpu", use_accelerate=False,
                         gradient_accumulation_steps=args.accumulation)
    root = Path(tempfile.mkdtemp(prefix="anydressing-synthetic-"))
    make_synthetic(str(root / "train"), count=args.samples, size=args.size, seed=0, layout=args.layout)
    make_synthetic(str(root / "val"), count=args.val_samples, size=args.size, seed=1, layout=args.layout)
    ds, val = FolderDataset(str(root / "train")), FolderDataset(str(root / "val"))
    patcher = adtest_tiny.tiny_model_patcher(0, model_channels=args.channels, num_heads=args.heads)
    unet = patcher.model.diffusion_model.to(device)
    vae = adtest_tiny.tiny_vae(0)
    context = torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(5)).to(device)

    raw_std = latent_std(vae.encode, ds, count=len(ds))
    scale = 1.0 / raw_std if args.latent_scale == "auto" else float(args.latent_scale)
    print(f"latent scale {scale:.4f} (training latents' std {raw_std * scale:.3f} after scaling)")

    def encode_image(x):
        with torch.no_grad():
            return (vae.encode(x) * scale).to(device)

    if args.pretrain_steps:
        pre_root = root / "pretrain"
        make_synthetic(str(pre_root), count=64, size=args.size, seed=2, layout=args.layout)
        pretrain_unet(unet, FolderDataset(str(pre_root)), encode_image, context, args.pretrain_steps,
                      args.pretrain_lr, args.seed)
    if half_dtype(args.mixed_precision) is not None:
        unet = unet.to(half_dtype(args.mixed_precision))

    decode = None
    if args.lambda_tex > 0:
        decoder = vae.first_stage_model.to(device).float().requires_grad_(False)

        def decode(z):  # differentiable, to [0, 1]
            return ((decoder.decode(z.float() / scale) + 1) / 2).clamp(0, 1)

    slots = ["upper", "lower"]
    # the pack's training-free mode: zero LoRA, W' = W, the attn1-input tap, strength 0.7
    free = DressingTrainer(unet, slots, rank=args.rank, alpha=float(args.rank), feature_tap="attn1_input",
                           strength=0.7, loc_reduction=args.loc_reduction, copy_unet=False)
    with engine.autocast():
        baseline = evaluate(free, val, encode_image, lambda c: context, timesteps=EVAL_TIMESTEPS, slots=slots)
    del free
    tr = DressingTrainer(unet, slots, rank=args.rank, alpha=float(args.rank), feature_tap=args.feature_tap,
                         loc_reduction=args.loc_reduction, gradient_checkpointing=args.gradient_checkpointing,
                         copy_unet=False).to(device)
    import peak_memory

    peak_memory.reset(device)
    start = time.perf_counter()
    history = train(tr, ds, encode_image, lambda c: context, steps=args.steps, lr=args.lr,
                    lambda_loc=args.lambda_loc, lambda_tex=args.lambda_tex, decode=decode, dropout=0.0,
                    engine=engine, seed=args.seed, val_dataset=val, eval_every=args.eval_every, log=args.log)
    seconds = (time.perf_counter() - start) / max(1, args.steps)
    peak = peak_memory.peak_mib(device)
    print(f"device {device} channels {args.channels} size {args.size} layout {args.layout} train {args.samples} "
          f"held-out {args.val_samples} steps {args.steps} x {args.accumulation} samples lr {args.lr} "
          f"heads {args.heads} lambda_loc {args.lambda_loc} lambda_tex {args.lambda_tex} "
          f"reduction {args.loc_reduction} tap {args.feature_tap} "
          f"precision {args.mixed_precision} checkpointing {args.gradient_checkpointing}")
    print("held-out figures (samples never trained on):")
    print(f"{'':16}{'diffusion':>11}{'localization':>14}{'mass inside':>13}{'mass outside':>14}"
          f"{'upper in/out':>15}{'lower in/out':>15}")

    def line(name, e):
        print(f"{name:16}{e['diffusion']:11.4f}{e['localization']:14.4f}{e['mass_inside']:13.4f}"
              f"{e['mass_outside']:14.4f}{e['mass_inside_upper']:8.3f}/{e['mass_outside_upper']:.3f}"
              f"{e['mass_inside_lower']:8.3f}/{e['mass_outside_lower']:.3f}")

    line("training-free", baseline)
    for row in history:
        if "val_diffusion" in row:
            line(f"step {row['step']}", {k[4:]: v for k, v in row.items() if k.startswith("val_")})
    if args.by_resolution:
        ts = (50, 200, 500, 800)
        with engine.autocast():
            seen = evaluate(tr, ds, encode_image, lambda c: context, timesteps=ts, limit=8, by_grid=True)
            held = evaluate(tr, val, encode_image, lambda c: context, timesteps=ts, by_grid=True)
        grids = sorted({k.split("_")[2] for k in held if k.startswith("mass_inside_") and "_t" in k},
                       key=lambda g: int(g.split("x")[0]))
        print("inside-mask share after training, per layer resolution (training samples / held out):")
        print(f"{'':10}" + "".join(f"{f't={t}':>16}" for t in ts))
        for g in grids:
            print(f"{g:10}" + "".join(f"{seen.get(f'mass_inside_{g}_t{t}', float('nan')):9.3f} / "
                                      f"{held.get(f'mass_inside_{g}_t{t}', float('nan')):.3f}" for t in ts))
    first, last = history[0], history[-1]
    print(f"training loss (training samples): first step {first['total']:.4f}, last step {last['total']:.4f}; "
          f"{seconds:.3f} s/step; peak memory {peak_memory.kind(device)} {peak:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
