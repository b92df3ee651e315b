"""The training loop: diffusion + lambda1 x localization + lambda2 x texture loss, AdamW, on one process or many
(see engine.py), with gradient accumulation, resumable checkpoints and a CSV loss log."""

from __future__ import annotations

import csv
import json
import os
import random
from pathlib import Path
from typing import Callable, Optional

import torch

from anydressing_core.masks import resize_to_grid

from .data import augment
from .engine import LocalEngine
from .trainer import DressingTrainer

EncodeImage = Callable[[torch.Tensor], torch.Tensor]  # [B, H, W, 3] in [0, 1] -> scaled latents [B, 4, h, w]
EncodeText = Callable[[str], torch.Tensor]  # caption -> [1, 77, 768]


def batch_for(sample, slots: list[str], encode_image: EncodeImage, encode_text: EncodeText):
    x0 = encode_image(sample.person.unsqueeze(0))
    garments = torch.cat([encode_image(sample.garments[s].unsqueeze(0)) for s in slots], dim=0)
    masks = torch.stack([sample.masks[s] for s in slots], dim=0).to(x0.device)
    return x0, garments, masks, encode_text(sample.caption)


def train(trainer: DressingTrainer, dataset, encode_image: EncodeImage, encode_text: EncodeText, steps: int,
          lr: float = 5e-5, lambda_loc: float = 0.01, dropout: float = 0.1, seed: int = 0,
          checkpoint: Optional[str] = None, log: Optional[str] = None, progress: bool = False,
          decode: Optional[Callable] = None, texture_net=None, lambda_tex: float = 0.001,
          texture_max_t: int = 350, engine: Optional[LocalEngine] = None, save_every: int = 0,
          max_grad_norm: float = 0.0) -> list[dict]:
    """Train for `steps` optimizer steps (resuming from `checkpoint` if it exists); returns the per-step losses.

    One step is engine.gradient_accumulation_steps samples on each of engine.num_processes processes; the logged
    losses are their mean. The checkpoint is written every `save_every` steps (0: only at the end), atomically,
    by the main process."""
    engine = engine or LocalEngine()
    params = [p for p in trainer.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    start, history = 0, []
    if checkpoint and Path(checkpoint).is_file():
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        trainer.load_state_dict(state["trainer"], strict=False)
        opt.load_state_dict(state["optimizer"])
        start = int(state["step"])
        history = json.loads(state["history"])
    model, opt = engine.prepare(trainer, opt)
    # each process draws its own samples; a resumed run draws new ones rather than repeating the first steps
    stream = seed + 1_000_003 * start + 7919 * engine.process_index
    rng = random.Random(stream)
    gen = torch.Generator().manual_seed(stream)
    steps_iter = range(start, steps)
    if progress and engine.is_main_process:
        from tqdm import tqdm

        steps_iter = tqdm(steps_iter, initial=start, total=steps, desc="training", unit="step")
    for step in steps_iter:
        sums = dict.fromkeys(LOSS_NAMES, 0.0)
        for _ in range(engine.gradient_accumulation_steps):
            sample = dataset[rng.randrange(len(dataset))]
            slots = augment(sample, rng, dropout)
            x0, garments, masks, context = batch_for(sample, slots, encode_image, encode_text)
            t = torch.randint(0, 1000, (1,), generator=gen).to(x0.device)
            noise = torch.randn(x0.shape, generator=gen).to(x0.device)
            texture = None
            if decode is not None:
                image = sample.person.permute(2, 0, 1).unsqueeze(0).to(x0.device)
                texture = {"decode": decode, "net": texture_net, "image": image, "max_t": texture_max_t}
            with engine.accumulate(model):
                with engine.autocast():
                    losses = model(x0, context, garments, slots, masks, t, noise, texture)
                losses = {k: v.float() for k, v in losses.items()}
                losses["total"] = (losses["diffusion"] + lambda_loc * losses["localization"] +
                                   lambda_tex * losses["texture"])
                engine.backward(losses["total"])
                if max_grad_norm > 0 and engine.sync_gradients:
                    engine.clip_grad_norm_(params, max_grad_norm)
                engine.step(opt)
            means = engine.reduce_mean(torch.stack([losses[k].detach() for k in LOSS_NAMES])).tolist()
            for k, v in zip(LOSS_NAMES, means):  # one collective per sample, not one per loss
                sums[k] += v
        row = {"step": step + 1, **{k: sums[k] / engine.gradient_accumulation_steps for k in LOSS_NAMES}}
        history.append(row)
        if log and engine.is_main_process:
            new = not Path(log).is_file()
            with open(log, "a", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(row))
                if new:
                    w.writeheader()
                w.writerow(row)
        if checkpoint and save_every and (step + 1) % save_every == 0 and step + 1 < steps:
            save_checkpoint(engine, trainer, opt, step + 1, history, checkpoint)
    if checkpoint:
        save_checkpoint(engine, trainer, opt, steps, history, checkpoint)
    return history


LOSS_NAMES = ("diffusion", "localization", "texture", "total")


def save_checkpoint(engine: LocalEngine, trainer: DressingTrainer, opt, step: int, history: list[dict],
                    path: str) -> None:
    """The trainable weights, the optimizer and the history, written to a temporary file and renamed, so an
    interruption while saving leaves the previous checkpoint intact."""
    engine.wait_for_everyone()
    if engine.is_main_process:
        tmp = f"{path}.tmp"
        torch.save({"trainer": trainer.trainable_state_dict(), "optimizer": opt.state_dict(), "step": step,
                    "history": json.dumps(history)}, tmp)
        os.replace(tmp, path)
    engine.wait_for_everyone()


@torch.no_grad()
def evaluate(trainer: DressingTrainer, dataset, encode_image: EncodeImage, encode_text: EncodeText,
             timesteps=(100, 300, 500, 700, 900), seed: int = 123, limit: int = 0) -> dict[str, float]:
    """Fixed noise and timesteps: mean diffusion and localization losses, and each garment's mean attention mass
    inside its mask minus outside it (averaged over layers)."""
    from anydressing_core.branch import AttentionProbe

    gen = torch.Generator().manual_seed(seed)
    diff, loc, inside, outside = [], [], [], []
    for i in range(min(len(dataset), limit) if limit else len(dataset)):
        sample = dataset[i]
        slots = list(sample.garments)
        x0, garments, masks, context = batch_for(sample, slots, encode_image, encode_text)
        features = trainer.encode(garments, slots)
        for t_val in timesteps:
            t = torch.tensor([t_val], device=x0.device)
            noise = torch.randn(x0.shape, generator=gen).to(x0.device)
            probe = AttentionProbe()
            eps = trainer.denoise(trainer.add_noise(x0, noise, t), t.float(), context, features, probe=probe)
            diff.append(float(((eps - noise) ** 2).mean()))
            terms = []
            for branch in probe.order:
                for mass, (h, w) in probe.maps[branch].values():
                    target = resize_to_grid(masks, h, w).to(mass.device)
                    terms.append(float(((mass[:, 0] - target) ** 2).mean()))
                    binary = target > 0.5
                    for k in range(len(slots)):
                        if binary[k].any() and (~binary[k]).any():
                            inside.append(float(mass[k, 0][binary[k]].mean()))
                            outside.append(float(mass[k, 0][~binary[k]].mean()))
            loc.append(sum(terms) / len(terms))
    return {"diffusion": sum(diff) / len(diff), "localization": sum(loc) / len(loc),
            "mass_inside": sum(inside) / len(inside), "mass_outside": sum(outside) / len(outside)}
