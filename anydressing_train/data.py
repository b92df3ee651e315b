"""The training data format, and a synthetic dataset for tests.

A dataset is a folder with one sub-folder per sample:
    person.png              the target image (the person wearing the garments)
    garment_<slot>.png      one image per garment, <slot> in upper, lower, dress, shoes, hat, bag, other
    mask_<slot>.png         where that garment is in person.png (white = garment)
    caption.txt             the prompt
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from anydressing_core.slots import SLOTS


@dataclass
class Sample:
    person: torch.Tensor  # [H, W, 3] in [0, 1]
    garments: dict[str, torch.Tensor]  # slot -> [h, w, 3]
    masks: dict[str, torch.Tensor]  # slot -> [H, W]
    caption: str


def _load_rgb(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0)


def _load_mask(path: Path) -> torch.Tensor:
    return torch.from_numpy((np.asarray(Image.open(path).convert("L"), dtype=np.float32) / 255.0))


class FolderDataset:
    def __init__(self, root: str):
        self.root = Path(root)
        self.items = sorted(p for p in self.root.iterdir() if (p / "person.png").is_file())
        if not self.items:
            raise ValueError(f"{root}: no sample folders with person.png")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Sample:
        d = self.items[i]
        garments = {s: _load_rgb(d / f"garment_{s}.png") for s in SLOTS if (d / f"garment_{s}.png").is_file()}
        missing = [s for s in garments if not (d / f"mask_{s}.png").is_file()]
        if missing:
            raise ValueError(f"{d}: garments without a mask: {missing}")
        masks = {s: _load_mask(d / f"mask_{s}.png") for s in garments}
        caption = (d / "caption.txt").read_text().strip() if (d / "caption.txt").is_file() else ""
        return Sample(_load_rgb(d / "person.png"), garments, masks, caption)


def augment(sample: Sample, rng: random.Random, dropout: float) -> list[str]:
    """Garment dropout (each garment dropped with probability `dropout`, at least one kept) and random slot order."""
    slots = list(sample.garments)
    kept = [s for s in slots if rng.random() >= dropout] or [rng.choice(slots)]
    rng.shuffle(kept)
    return kept


def make_synthetic(root: str, count: int = 8, size: int = 64, seed: int = 0) -> None:
    """Flat striped garments composited into known regions of a simple figure (upper: torso, lower: legs)."""
    rng = np.random.default_rng(seed)
    root_p = Path(root)
    h = w = size
    for i in range(count):
        d = root_p / f"sample{i:03d}"
        d.mkdir(parents=True, exist_ok=True)
        person = np.full((h, w, 3), 0.5, np.float32)
        body = (slice(h // 8, h - h // 8), slice(w // 3, w - w // 3))
        person[body] = (0.85, 0.7, 0.6)
        regions = {"upper": (slice(h // 8 + h // 16, h // 2), slice(w // 4, w - w // 4)),
                   "lower": (slice(h // 2, h - h // 8), slice(w // 3, w - w // 3))}
        for slot, region in regions.items():
            color = rng.random(3).astype(np.float32)
            period = int(rng.integers(3, 7))
            yy = np.arange(h)[:, None]
            stripes = ((yy // period) % 2).astype(np.float32)[..., None]
            texture = np.broadcast_to(color * (0.6 + 0.4 * stripes), (h, w, 3))
            garment = np.ones((h, w, 3), np.float32)
            garment[h // 8: h - h // 8, w // 6: w - w // 6] = texture[h // 8: h - h // 8, w // 6: w - w // 6]
            Image.fromarray((garment * 255).astype(np.uint8)).save(d / f"garment_{slot}.png")
            person[region] = texture[region]
            mask = np.zeros((h, w), np.uint8)
            mask[region] = 255
            Image.fromarray(mask).save(d / f"mask_{slot}.png")
        Image.fromarray((person * 255).astype(np.uint8)).save(d / "person.png")
        (d / "caption.txt").write_text("a person wearing a striped top and striped trousers")
