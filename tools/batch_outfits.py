"""Outfits for batch dressing: read from a CSV or from a folder of garments, every garment checked before any work.

A garment must be an image that opens, inside the CSV's folder (or the garments folder) unless the user allows paths
outside it. Every refusal names the row (or file) and the path, and comes before anything is uploaded or dressed.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from anydressing_core.slots import MAX_GARMENTS, SLOTS

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class Outfit:
    id: str
    garments: dict[str, str]  # slot -> image path
    prompt: str = ""
    negative: str = ""
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def record(self) -> dict:
        return {"id": self.id, "garments": self.garments, "prompt": self.prompt, "negative": self.negative,
                "seed": self.seed}

    def garment_set(self) -> tuple:
        """Outfits with the same garment set share one Encode Garments result (ComfyUI's node cache)."""
        return tuple(sorted(self.garments.items()))


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def check_image(path: Path, where: str) -> None:
    """Refuse a garment that is not a readable image, naming where it was given."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise SystemExit(f"{where}: garment image not found: {path}")
    try:
        with Image.open(path) as im:
            im.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise SystemExit(f"{where}: {path} is not a readable image ({type(e).__name__}: {e})") from None


def outfits_from_csv(path: Path, allow_outside: bool = False) -> list[Outfit]:
    out, seen = [], set()
    base = path.parent
    with open(path, newline="", encoding="utf-8") as f:
        for i, row in enumerate(csv.DictReader(f), start=1):
            where = f"{path.name}: row {i}"
            garments = {s: row[s].strip() for s in SLOTS if (row.get(s) or "").strip()}
            if not garments:
                raise SystemExit(f"{where} names no garment (columns: {', '.join(SLOTS)})")
            if len(garments) > MAX_GARMENTS:
                raise SystemExit(f"{where} names {len(garments)} garments; Encode Garments takes at most "
                                 f"{MAX_GARMENTS}")
            resolved = {}
            for slot, p in garments.items():
                full = Path(p) if os.path.isabs(p) else base / p
                if not allow_outside and not _inside(full, base):
                    raise SystemExit(f"{where}: {slot} {p} is outside the CSV's folder {base.resolve()}; move it "
                                     f"there or pass --allow-paths-outside")
                check_image(full, f"{where}, {slot}")
                resolved[slot] = str(full.resolve())
            oid = (row.get("id") or f"outfit{i:04d}").strip()
            if oid in (".", "..") or any(c in oid for c in '/\\:*?"<>|'):
                raise SystemExit(f"{where}: id {oid!r} names the images, so it cannot hold / \\ : * ? \" < > |")
            if oid in seen:
                raise SystemExit(f"{where}: id {oid!r} is used twice; ids name the images and the resume list")
            seen.add(oid)
            try:
                seed = int(row.get("seed") or 0)
            except ValueError:
                raise SystemExit(f"{where}: seed {row.get('seed')!r} is not a whole number") from None
            out.append(Outfit(id=oid, garments=resolved, prompt=row.get("prompt", "") or "",
                              negative=row.get("negative", "") or "", seed=seed))
    return out


def outfits_from_folder(folder: Path, prompt: str, seeds: list[int]) -> list[Outfit]:
    pools = []
    for slot in SLOTS:
        d = folder / slot
        if d.is_dir():
            files = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
            for p in files:
                check_image(p, f"{folder.name}/{slot}")
            if files:
                pools.append((slot, files))
    if not pools:
        raise SystemExit(f"{folder}: no slot sub-folders with images (expected some of: {', '.join(SLOTS)})")
    out = []
    for combo in itertools.product(*[files for _, files in pools]):
        for seed in seeds:
            garments = {slot: str(p.resolve()) for (slot, _), p in zip(pools, combo)}
            oid = "_".join(p.stem for p in combo) + f"_s{seed}"
            out.append(Outfit(id=oid, garments=garments, prompt=prompt, seed=seed))
    return out


def content_name(path: Path) -> str:
    """A name from the file's content: the same garment is uploaded once, whatever it is called."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] + path.suffix.lower()


class Manifest:
    """output/<out>/done.jsonl: one line per outfit whose images are safely on disk, so a re-run skips exactly those."""

    def __init__(self, folder: Path):
        self.path = folder / "done.jsonl"

    def done_ids(self) -> set[str]:
        if not self.path.exists():
            return set()
        ids = set()
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                ids.add(json.loads(line)["id"])
            except (ValueError, KeyError):
                continue  # a line cut short by a crash: that outfit is redone
        return ids

    def add(self, outfit: Outfit) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(outfit.record()) + "\n")
            f.flush()
            os.fsync(f.fileno())


def save_atomically(path: Path, data: bytes) -> None:
    """Write then rename: a file under its final name is always whole."""
    part = path.with_name(path.name + ".part")
    with open(part, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, path)
