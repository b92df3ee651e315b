"""The training loop: diffusion + lambda1 x localization + lambda2 x texture loss, AdamW, on one process or many
(see engine.py), with gradient accumulation, resumable checkpoints, a CSV loss log and a held-out evaluation every
N steps (diffusion loss and each garment's attention mass inside and outside its mask, on samples never trained on)."""

from __future__ import annotations

import csv
import json
import os
import random
from pathlib import Path
from typing import Callable, Optional

import torch

from .data import augment
from .engine import LocalEngine
from .trainer import DressingTrainer, localization_loss, probed_layers

EncodeImage = Callable[[torch.Tensor], torch.Tensor]  # [B, H, W, 3] in [0, 1] -> scaled latents [B, 4, h, w]
EncodeText = Callable[[str], torch.Tensor]  # caption -> [1, 77, 768]

LOSS_NAMES = ("diffusion", "localization", "texture", "total")
EVAL_TIMESTEPS = (200, 500, 800)  # the held-out evaluation's fixed timesteps (one noise draw each)


def batch_for(sample, slots: list[str], encode_image: EncodeImage, encode_text: EncodeText):
    x0 = encode_image(sample.person.unsqueeze(0))
    garments = torch.cat([encode_image(sample.garments[s].unsqueeze(0)) for s in slots], dim=0)
    masks = torch.stack([sample.masks[s] for s in slots], dim=0).to(x0.device)
    return x0, garments, masks, encode_text(sample.caption)


# SD1.5's VAE with its 0.18215 factor gives latents of about unit std; far outside this range, the noise of a timestep
# hides much more (or less) of the image than the UNet learned to undo, and a garment's place stays unseen
LATENT_STD_RANGE = (0.35, 3.0)


def latent_std(encode_image: EncodeImage, dataset, count: int = 8) -> float:
    """The std of the first `count` samples' person latents, as encode_image gives them to the UNet."""
    with torch.no_grad():
        z = torch.cat([encode_image(dataset[i].person.unsqueeze(0)).float() for i in range(min(count, len(dataset)))])
    return float(z.std())


def latent_std_warning(std: float) -> Optional[str]:
    """A warning when the training latents' scale is far from SD1.5's (None when it is in LATENT_STD_RANGE)."""
    low, high = LATENT_STD_RANGE
    if low <= std <= high:
        return None
    return (f"[AnyDressing] training: the training images' latents have std {std:.3g}, where SD1.5's VAE with its "
            f"0.18215 scale gives about 1 (expected {low}-{high}): this checkpoint's VAE does not match its UNet's "
            f"latent scale, so the noise of each timestep hides {'more' if std < low else 'less'} of the image than "
            f"the UNet learned to undo and the garments' places are hard to learn; use a checkpoint with the SD1.5 "
            f"VAE baked in")


class ResumeError(ValueError):
    """A training checkpoint that does not fit this run."""


def check_resume(trainer: DressingTrainer, state: dict, checkpoint: str) -> None:
    """Refuse a checkpoint of another training setup (other slots, LoRA rank, feature tap or GarmentsNet choice)
    instead of silently training fresh parameters where its tensors do not fit: every trainable tensor must be there,
    with its shape, and nothing else."""
    mine = trainer.trainable_state_dict()
    theirs = state.get("trainer") or {}
    missing = sorted(set(mine) - set(theirs))
    unexpected = sorted(set(theirs) - set(mine))
    reshaped = sorted(k for k in set(mine) & set(theirs) if tuple(mine[k].shape) != tuple(theirs[k].shape))
    problems = []
    if missing:
        problems.append(f"it lacks {len(missing)} tensor(s) this run trains, e.g. {missing[0]}")
    if unexpected:
        problems.append(f"it has {len(unexpected)} tensor(s) this run does not train, e.g. {unexpected[0]}")
    if reshaped:
        k = reshaped[0]
        problems.append(f"{len(reshaped)} tensor(s) have another shape, e.g. {k} {tuple(theirs[k].shape)} here "
                        f"{tuple(mine[k].shape)}")
    if problems:
        raise ResumeError(f"[AnyDressing] training: cannot resume from {checkpoint}: it was saved by another training "
                         f"setup ({'; '.join(problems)}). Run with the --slots, --rank, --feature-tap and "
                         f"--finetune-garments-net it was started with, or start afresh with another --out")


def train(trainer: DressingTrainer, dataset, encode_image: EncodeImage, encode_text: EncodeText, steps: int,
          lr: float = 5e-5, lambda_loc: float = 0.01, dropout: float = 0.1, seed: int = 0,
          checkpoint: Optional[str] = None, log: Optional[str] = None, progress: bool = False,
          decode: Optional[Callable] = None, texture_net=None, lambda_tex: float = 0.001,
          texture_max_t: int = 350, engine: Optional[LocalEngine] = None, save_every: int = 0,
          max_grad_norm: float = 0.0, val_dataset=None, eval_every: int = 0,
          eval_timesteps=EVAL_TIMESTEPS, eval_limit: int = 0) -> list[dict]:
    """Train for `steps` optimizer steps (resuming from `checkpoint` if it exists); returns the per-step losses.

    One step is engine.gradient_accumulation_steps samples on each of engine.num_processes processes; the logged
    losses are their mean. The checkpoint is written every `save_every` steps (0: only at the end), atomically,
    by the main process. With `val_dataset` (samples never trained on), the main process evaluates it before the
    first step and every `eval_every` steps (0: at the start and the end only) and adds `val_*` columns to that
    step's row. A fresh run (no checkpoint to resume) starts a new `log`; a resumed one appends to it."""
    engine = engine or LocalEngine()
    params = [p for p in trainer.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    start, history = 0, []
    if checkpoint and Path(checkpoint).is_file():
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        check_resume(trainer, state, checkpoint)
        trainer.load_state_dict(state["trainer"], strict=False)  # (strict would also want the frozen UNet)
        opt.load_state_dict(state["optimizer"])
        start = int(state["step"])
        history = json.loads(state["history"])
    model, opt = engine.prepare(trainer, opt)
    # each process draws its own samples; a resumed run draws new ones rather than repeating the first steps
    stream = seed + 1_000_003 * start + 7919 * engine.process_index
    rng = random.Random(stream)
    gen = torch.Generator().manual_seed(stream)
    steps_iter = range(start, steps)
    bar = None
    if progress and engine.is_main_process:
        from tqdm import tqdm

        steps_iter = bar = tqdm(steps_iter, initial=start, total=steps, desc="training", unit="step")
    trainer_slots = list(getattr(trainer, "slots", []))
    fields = ["step", *LOSS_NAMES] + (val_fields(trainer_slots) if val_dataset is not None else [])
    if log and engine.is_main_process and start == 0:
        Path(log).unlink(missing_ok=True)  # a fresh run never appends to an old run's log

    def held_out(step: int) -> dict:
        if val_dataset is None:
            return {}
        row = {}
        if engine.is_main_process:
            trainer.eval()
            with engine.autocast():
                e = evaluate(trainer, val_dataset, encode_image, encode_text, timesteps=eval_timesteps,
                             limit=eval_limit, slots=trainer_slots)
            trainer.train()
            row = {f"val_{k}": v for k, v in e.items()}
            if bar is not None:
                bar.set_postfix({"val_diff": f"{e['diffusion']:.4f}", "val_in": f"{e['mass_inside']:.3f}",
                                 "val_out": f"{e['mass_outside']:.3f}"}, refresh=False)
        engine.wait_for_everyone()
        return row

    pending = held_out(start) if start == 0 else {}
    if pending and log and engine.is_main_process:  # the held-out figures before training (the step-0 row)
        _write_row(log, fields, {"step": 0, **pending})
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
        if val_dataset is not None and ((eval_every and (step + 1) % eval_every == 0) or step + 1 == steps):
            row.update(held_out(step + 1))
        history.append(row)
        if log and engine.is_main_process:
            _write_row(log, fields, row)
        if checkpoint and save_every and (step + 1) % save_every == 0 and step + 1 < steps:
            save_checkpoint(engine, trainer, opt, step + 1, history, checkpoint)
    if checkpoint:
        save_checkpoint(engine, trainer, opt, steps, history, checkpoint)
    return history




def val_fields(slots: list[str]) -> list[str]:
    """The held-out columns of the log: overall figures, then each slot's mass inside and outside its mask."""
    per_slot = [f"val_mass_{side}_{s}" for s in slots for side in ("inside", "outside")]
    return ["val_diffusion", "val_localization", "val_mass_inside", "val_mass_outside", *per_slot]


def _write_row(path: str, fields: list[str], row: dict) -> None:
    new = not Path(path).is_file()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, restval="", extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerow(row)


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
             timesteps=(100, 300, 500, 700, 900), seed: int = 123, limit: int = 0,
             slots: Optional[list[str]] = None, by_grid: bool = False) -> dict[str, float]:
    """Fixed noise and timesteps, every garment of each sample: the mean diffusion loss, the localization loss as the
    trainer reduces it, and each garment's mean attention mass A_k inside its mask and outside it (over layers,
    timesteps and samples; with two garments and no training both are about 0.5), overall and per slot in `slots`;
    with `by_grid`, also per layer resolution and timestep (mass_inside_<h>x<w>_t<t>: where localization is learned)."""
    from anydressing_core.run_state import AttentionProbe

    gen = torch.Generator().manual_seed(seed)
    diff, loc, inside, outside = [], [], [], []
    per_slot: dict[str, list[float]] = {}
    per_grid: dict[str, list[float]] = {}
    reduction = getattr(trainer, "loc_reduction", "mean")
    for i in range(min(len(dataset), limit) if limit else len(dataset)):
        sample = dataset[i]
        sample_slots = list(sample.garments)
        x0, garments, masks, context = batch_for(sample, sample_slots, encode_image, encode_text)
        features = trainer.encode(garments, sample_slots)
        for t_val in timesteps:
            t = torch.tensor([t_val], device=x0.device)
            noise = torch.randn(x0.shape, generator=gen).to(x0.device)
            probe = AttentionProbe()
            eps = trainer.denoise(trainer.add_noise(x0, noise, t), t.float(), context, features, probe=probe)
            diff.append(float(((eps - noise) ** 2).mean()))
            loc.append(float(localization_loss(probe, masks, tuple(x0.shape[-2:]), reduction)))
            for mass, target, (h, w) in probed_layers(probe, masks):
                binary = target > 0.5
                for k, slot in enumerate(sample_slots):
                    if binary[k].any() and (~binary[k]).any():
                        a_in, a_out = float(mass[k, 0][binary[k]].mean()), float(mass[k, 0][~binary[k]].mean())
                        inside.append(a_in)
                        outside.append(a_out)
                        per_slot.setdefault(f"mass_inside_{slot}", []).append(a_in)
                        per_slot.setdefault(f"mass_outside_{slot}", []).append(a_out)
                        if by_grid:
                            per_grid.setdefault(f"mass_inside_{h}x{w}_t{t_val}", []).append(a_in)
    # (no sample, or no mask with pixels both inside and outside: the means are NaN, not a division by zero)
    out = {"diffusion": _mean(diff), "localization": _mean(loc), "mass_inside": _mean(inside),
           "mass_outside": _mean(outside)}
    for slot in slots or []:
        for side in ("inside", "outside"):
            out[f"mass_{side}_{slot}"] = _mean(per_slot.get(f"mass_{side}_{slot}", []))
    if by_grid:
        out.update({k: _mean(v) for k, v in per_grid.items()})
    return out


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")
