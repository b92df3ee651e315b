"""The training loop: diffusion loss + lambda1 x localization loss, AdamW, resumable, logged."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path
from typing import Callable, Optional

import torch

from anydressing_core.masks import resize_to_grid

from .data import augment
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
          texture_max_t: int = 350) -> list[dict]:
    """Train for `steps` steps (resuming from `checkpoint` if it exists); returns the per-step losses."""
    params = [p for p in trainer.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    start, history = 0, []
    if checkpoint and Path(checkpoint).is_file():
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        trainer.load_state_dict(state["trainer"], strict=False)
        opt.load_state_dict(state["optimizer"])
        start = int(state["step"])
        history = json.loads(state["history"])
    rng = random.Random(seed + start)
    gen = torch.Generator().manual_seed(seed + start)
    steps_iter = range(start, steps)
    if progress:
        from tqdm import tqdm

        steps_iter = tqdm(steps_iter, initial=start, total=steps, desc="training", unit="step")
    for step in steps_iter:
        sample = dataset[rng.randrange(len(dataset))]
        slots = augment(sample, rng, dropout)
        x0, garments, masks, context = batch_for(sample, slots, encode_image, encode_text)
        t = torch.randint(0, 1000, (1,), generator=gen).to(x0.device)
        noise = torch.randn(x0.shape, generator=gen).to(x0.device)
        texture = None
        if decode is not None:
            image = sample.person.permute(2, 0, 1).unsqueeze(0).to(x0.device)
            texture = {"decode": decode, "net": texture_net, "image": image, "max_t": texture_max_t}
        losses = trainer.losses(x0, context, garments, slots, masks, t, noise, texture)
        total = losses["diffusion"] + lambda_loc * losses["localization"] + lambda_tex * losses["texture"]
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        row = {"step": step + 1, "diffusion": float(losses["diffusion"].detach()),
               "localization": float(losses["localization"].detach()),
               "texture": float(losses["texture"].detach()), "total": float(total.detach())}
        history.append(row)
        if log:
            new = not Path(log).is_file()
            with open(log, "a", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(row))
                if new:
                    w.writeheader()
                w.writerow(row)
    if checkpoint:
        torch.save({"trainer": {k: v for k, v in trainer.state_dict().items() if not k.startswith("unet.")},
                    "optimizer": opt.state_dict(), "step": steps, "history": json.dumps(history)}, checkpoint)
    return history


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
