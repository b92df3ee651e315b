"""Train AnyDressing weights from an SD1.5 checkpoint file and a data folder; writes the pack's native file.

    python -m anydressing_train --comfyui ~/ComfyUI --checkpoint v1-5-pruned-emaonly.safetensors --data data/ \\
        --slots upper,lower --steps 100000 --out models/anydressing/my_anydressing.safetensors

Runs in the ComfyUI Python environment (it uses ComfyUI's loaders, UNet, VAE and text encoder). On several GPUs or
nodes, start it with accelerate (the training extra): `accelerate launch --multi_gpu --num_processes 8 -m
anydressing_train ...`. Re-running the same command resumes from <out>.state.pt (written every --save-every steps).
Extra ComfyUI flags go after "--".
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from anydressing_train.engine import MIXED_PRECISION  # noqa: E402  (plain torch; ComfyUI is booted later)


def file_sha256(path: str, limit: int = 64 * 2**20) -> str:
    """The first 64 MiB's SHA-256 (enough to tell checkpoints apart, fast on multi-GB files)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(limit))
    return h.hexdigest()


def boot(comfyui: Path, flags: list[str]) -> None:
    sys.path.insert(0, str(comfyui))
    saved = sys.argv
    sys.argv = ["main.py"] + flags
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        import comfy.cli_args  # noqa: F401  (parses the flags before comfy.model_management is imported)
    finally:
        sys.argv = saved


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    flags = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(prog="python -m anydressing_train", description=__doc__.splitlines()[0])
    ap.add_argument("--comfyui", required=True, help="the ComfyUI folder")
    ap.add_argument("--checkpoint", required=True, help="an SD1.5-family checkpoint file (.safetensors)")
    ap.add_argument("--data", required=True, help="the data folder (see anydressing_train.data)")
    ap.add_argument("--slots", default="upper,lower")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--alpha", type=float, default=64.0)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--lambda-loc", type=float, default=0.01, help="weight of the localization loss (paper: 0.01)")
    ap.add_argument("--loc-reduction", choices=("sum", "paper_scale", "mean"), default="sum",
                    help="L_loc per layer: sum (eq. 9, squared norm over the layer's pixels), paper_scale (that sum as at "
                         "768x576, so lambda-loc 0.01 keeps the paper's balance at any size) or mean (per pixel)")
    ap.add_argument("--feature-tap", choices=("gfe_output", "attn1_input"), default="gfe_output",
                    help="GarmentsNet features: gfe_output (F^new, the GFE self-attention output, eq. 4-5; every "
                         "layer's LoRA trains; localizes faster on the synthetic bench) or attn1_input (the "
                         "self-attention input after norm1, as MagicClothing/IMAGDressing; starts exactly at "
                         "training-free mode; no LoRA for the last layer, which could not train)")
    ap.add_argument("--strength", type=float, default=1.0,
                    help="Dressing-Attention lambda during training; recorded in the file for Apply's auto strength")
    ap.add_argument("--val-data", help="a held-out data folder, evaluated every --eval-every steps")
    ap.add_argument("--val-fraction", type=float, default=0.0,
                    help="without --val-data: hold out this fraction of --data (seeded) for the evaluation")
    ap.add_argument("--eval-every", type=int, default=500, help="held-out evaluation every N steps")
    ap.add_argument("--eval-samples", type=int, default=64, help="held-out samples per evaluation (0: all)")
    ap.add_argument("--dropout", type=float, default=0.1, help="garment dropout probability")
    ap.add_argument("--perceptual-net", help="VGG16 weights (torchvision layout, .safetensors) for the texture loss")
    ap.add_argument("--lambda-tex", type=float, default=0.001, help="weight of the texture loss (paper: 0.001)")
    ap.add_argument("--texture-max-t", type=int, default=350, help="texture loss only for t <= this (paper: 350)")
    ap.add_argument("--finetune-garments-net", action="store_true",
                    help="also train the whole GarmentsNet (a copy of the UNet; the file then holds its weights)")
    ap.add_argument("--mixed-precision", choices=MIXED_PRECISION, default="no",
                    help="bf16 or fp16 autocast, frozen UNet weights stored in that dtype (fp16 needs a GPU)")
    ap.add_argument("--gradient-checkpointing", action="store_true",
                    help="recompute block activations in the backward pass: less memory, about a third more time")
    ap.add_argument("--gradient-accumulation-steps", type=int, default=1,
                    help="samples per process per optimizer step (the batch is this x the number of processes)")
    ap.add_argument("--max-grad-norm", type=float, default=0.0, help="clip gradients to this norm (0: off)")
    ap.add_argument("--save-every", type=int, default=500, help="write the resumable state every N steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, help="the native .safetensors to write")
    args = ap.parse_args(argv)
    # a fresh ComfyUI has no models/anydressing/ until the pack has started once; the log and state go beside --out
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)

    boot(Path(args.comfyui), flags)

    from anydressing_train.data import FolderDataset
    from anydressing_train.engine import accelerate_available, half_dtype, make_engine
    from anydressing_train.loop import ResumeError, train
    from anydressing_train.trainer import DressingTrainer

    # accelerate first: under a multi-process launch it selects this process's GPU before ComfyUI's model management
    # is imported and looks at devices (otherwise every process would start on GPU 0)
    accumulation = args.gradient_accumulation_steps
    engine = None
    if accelerate_available():
        engine = make_engine(args.mixed_precision, cpu="--cpu" in flags, gradient_accumulation_steps=accumulation)
    import comfy.model_management as mm

    from anydressing_train.checkpoint import load_sd15

    if engine is None:
        engine = make_engine(args.mixed_precision, device=mm.get_torch_device(), use_accelerate=False,
                             gradient_accumulation_steps=accumulation)
    device = engine.device
    models = load_sd15(args.checkpoint, device)
    unet = models.unet
    if half_dtype(args.mixed_precision) is not None:  # frozen weights in half precision; trained ones stay fp32
        unet = unet.to(half_dtype(args.mixed_precision))

    decode, net = None, None
    if args.lambda_tex > 0:
        decode = models.decode
        if args.perceptual_net:
            from safetensors.torch import load_file

            from anydressing_train.texture import VGGFeatures

            net = VGGFeatures(load_file(args.perceptual_net)).to(device)
    dataset, val = FolderDataset(args.data), None
    if args.val_data:
        val = FolderDataset(args.val_data)
    elif args.val_fraction > 0:
        dataset, val = dataset.split(args.val_fraction, seed=args.seed)
    if engine.is_main_process:
        from anydressing_train.loop import latent_std, latent_std_warning

        warning = latent_std_warning(latent_std(models.encode_image, dataset))
        if warning:
            print(warning, flush=True)
    if val is not None and engine.is_main_process:
        print(f"held-out evaluation: {len(val)} samples ({args.val_data or f'{args.val_fraction:g} of {args.data}'})"
              f", every {args.eval_every} steps; training on {len(dataset)}", flush=True)
    # the UNet was loaded for this run alone: hand it over rather than copy it
    trainer = DressingTrainer(unet, args.slots.split(","), rank=args.rank, alpha=args.alpha,
                              finetune_garments_net=args.finetune_garments_net,
                              gradient_checkpointing=args.gradient_checkpointing, feature_tap=args.feature_tap,
                              strength=args.strength, loc_reduction=args.loc_reduction, copy_unet=False).to(device)
    try:
        history = train(trainer, dataset, models.encode_image, models.encode_text, steps=args.steps, lr=args.lr,
                        lambda_loc=args.lambda_loc, dropout=args.dropout, seed=args.seed,
                        checkpoint=args.out + ".state.pt", log=args.out + ".losses.csv", progress=True,
                        decode=decode, texture_net=net, lambda_tex=args.lambda_tex, texture_max_t=args.texture_max_t,
                        engine=engine, save_every=args.save_every, max_grad_norm=args.max_grad_norm, val_dataset=val,
                        eval_every=args.eval_every, eval_limit=args.eval_samples)
    except ResumeError as e:
        raise SystemExit(str(e)) from None
    if engine.is_main_process:
        trainer.save(args.out, {"base_model": Path(args.checkpoint).name,
                                "base_model_sha256_64mib": file_sha256(args.checkpoint),
                                "steps": len(history), "lambda_loc": args.lambda_loc, "lambda_tex": args.lambda_tex,
                                "mixed_precision": args.mixed_precision, "processes": engine.num_processes,
                                "batch": engine.num_processes * engine.gradient_accumulation_steps})
        last = history[-1] if history else {}
        print(f"wrote {args.out} after {len(history)} steps; last losses {last}", flush=True)
    engine.wait_for_everyone()
    return 0


if __name__ == "__main__":
    sys.exit(main())
