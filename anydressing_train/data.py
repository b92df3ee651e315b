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
    def __init__(self, root: str, items: list[Path] | None = None):
        self.root = Path(root)
        self.items = sorted(p for p in self.root.iterdir() if (p / "person.png").is_file()) if items is None else items
        if not self.items:
            raise ValueError(f"{root}: no sample folders with person.png")

    def split(self, fraction: float, seed: int = 0) -> tuple["FolderDataset", "FolderDataset"]:
        """(training, held-out): a seeded random `fraction` of the samples (at least one) is held out, so the
        held-out figures are on samples the run never trains on."""
        if not 0 < fraction < 1:
            raise ValueError(f"the held-out fraction must be between 0 and 1, not {fraction}")
        if len(self.items) < 2:
            raise ValueError(f"{self.root}: {len(self.items)} sample(s) cannot be split into training and held-out")
        order = list(self.items)
        random.Random(seed).shuffle(order)
        n = min(len(order) - 1, max(1, round(fraction * len(order))))
        return FolderDataset(str(self.root), sorted(order[n:])), FolderDataset(str(self.root), sorted(order[:n]))

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


SYNTHETIC_LAYOUTS = ("fixed", "random", "halves")


def _random_regions(rng: np.random.Generator, h: int, w: int, fill: bool = False
                    ) -> dict[str, tuple[slice, slice]]:
    """Two boxes of random size and place in the two halves of the image (split top/bottom or left/right at random),
    each slot in either half with equal odds: a garment's place says nothing about its slot."""
    vertical = bool(rng.integers(2))
    halves = [(0, h // 2, 0, w), (h // 2, h, 0, w)] if vertical else [(0, h, 0, w // 2), (0, h, w // 2, w)]
    if rng.integers(2):
        halves.reverse()
    regions = {}
    for slot, (y0, y1, x0, x1) in zip(("upper", "lower"), halves):
        if fill:  # the garment covers its whole half: no pixel outside both masks
            regions[slot] = (slice(y0, y1), slice(x0, x1))
            continue
        bh = int(rng.integers((y1 - y0) // 2, (y1 - y0) * 7 // 8 + 1))
        bw = int(rng.integers((x1 - x0) // 2, (x1 - x0) * 7 // 8 + 1))
        top = y0 + int(rng.integers(0, y1 - y0 - bh + 1))
        left = x0 + int(rng.integers(0, x1 - x0 - bw + 1))
        regions[slot] = (slice(top, top + bh), slice(left, left + bw))
    return regions


def make_synthetic(root: str, count: int = 8, size: int = 64, seed: int = 0, layout: str = "fixed",
                   first: int = 0) -> None:
    """Flat striped garments composited into known regions of a simple figure.

    layout "fixed": upper on the torso, lower on the legs (slot -> place is a shortcut); "random": each garment in a
    random box, the slot giving no hint of where (only its colour and stripes do); "halves": as random, but each
    garment fills its whole half, so every pixel is in exactly one mask (no background, where eq. 9's best A_k is
    an even split the attention can only reach by telling background from garment). Samples are named from `first`,
    so a held-out set can share a folder name scheme without clashing."""
    if layout not in SYNTHETIC_LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(SYNTHETIC_LAYOUTS)}, not {layout!r}")
    rng = np.random.default_rng(seed)
    root_p = Path(root)
    h = w = size
    for i in range(first, first + count):
        d = root_p / f"sample{i:03d}"
        d.mkdir(parents=True, exist_ok=True)
        person = np.full((h, w, 3), 0.5, np.float32)
        body = (slice(h // 8, h - h // 8), slice(w // 3, w - w // 3))
        person[body] = (0.85, 0.7, 0.6)
        regions = {"upper": (slice(h // 8 + h // 16, h // 2), slice(w // 4, w - w // 4)),
                   "lower": (slice(h // 2, h - h // 8), slice(w // 3, w - w // 3))}
        if layout in ("random", "halves"):
            regions = _random_regions(rng, h, w, fill=layout == "halves")
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
