"""Turn the public DressCode and VITON-HD releases into the training folder format (anydressing_train.data).

    python -m anydressing_train.convert_dataset dresscode /data/DressCode data/ --split train
    python -m anydressing_train.convert_dataset vitonhd /data/zalando-hd-resized data/ --split train

Each person becomes one sample, as the paper builds its triplets (§5.1): the dataset's flat-lay garment for the
person's category, plus the complementary garment cropped from the person photo with the human-parsing map (upper
from a lower-body sample, lower from an upper-body one), on white. The masks come from the parsing map.

Layouts read (the releases as their authors ship them):
- DressCode: <root>/<upper_body|lower_body|dresses>/{train_pairs.txt, test_pairs_paired.txt, images/<id>_0.jpg
  (person), images/<id>_1.jpg (garment), label_maps/<id>_4.png}; labels 0-17 (4 upper_clothes, 5 skirt, 6 pants,
  7 dress, ...).
- VITON-HD: <root>/<train|test>_pairs.txt and <root>/<train|test>/{image/<id>.jpg, cloth/<id>.jpg,
  image-parse-v3/<id>.png}; CIHP labels 0-19 (5 upper clothes, 6 dress, 7 coat, 9 pants, 12 skirt, ...). In paired
  mode the first column names both the person and the garment.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from PIL import Image

from anydressing_core.preprocess import fit_and_pad

# parsing labels of each garment slot
DRESSCODE_LABELS = {"upper": (4,), "lower": (5, 6), "dress": (7,)}
VITONHD_LABELS = {"upper": (5, 7), "lower": (9, 12), "dress": (6,)}
DRESSCODE_CATEGORIES = {"upper_body": "upper", "lower_body": "lower", "dresses": "dress"}
# the garment cropped from the person photo, by the flat-lay's slot (a dress has no complementary garment)
COMPLEMENT = {"upper": "lower", "lower": "upper"}
MIN_CROP_FRACTION = 0.01  # a cropped garment smaller than 1% of the image is too little to learn from
DEFAULT_CAPTION = "a photo of a person"


class DatasetLayoutError(ValueError):
    pass


@dataclass
class Source:
    """One person of a source dataset."""

    name: str  # the output folder's name
    person: Path
    garment: Path  # the flat-lay garment
    slot: str  # the flat-lay garment's slot
    parse: Path
    labels: dict[str, tuple[int, ...]]


def _pairs(path: Path) -> list[str]:
    """First column of a pairs file (the person; in paired mode also the garment)."""
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise DatasetLayoutError(f"{what} not found (expected at {path})")
    return path


def dresscode_sources(root: Path, split: str, categories: Optional[list[str]] = None) -> Iterator[Source]:
    cats = categories or [c for c in DRESSCODE_CATEGORIES if (root / c).is_dir()]
    if not cats:
        raise DatasetLayoutError(f"no DressCode category folder in {root} (expected {', '.join(DRESSCODE_CATEGORIES)})")
    pairs_name = "train_pairs.txt" if split == "train" else "test_pairs_paired.txt"
    for cat in cats:
        if cat not in DRESSCODE_CATEGORIES:
            raise DatasetLayoutError(f"unknown DressCode category {cat!r}; known: {', '.join(DRESSCODE_CATEGORIES)}")
        base = root / cat
        for person in _pairs(_need(base / pairs_name, f"DressCode {cat} pairs file")):
            stem = person.rsplit("_", 1)[0]
            yield Source(f"dresscode_{cat}_{stem}", base / "images" / person, base / "images" / f"{stem}_1.jpg",
                         DRESSCODE_CATEGORIES[cat], base / "label_maps" / f"{stem}_4.png", DRESSCODE_LABELS)


def vitonhd_sources(root: Path, split: str) -> Iterator[Source]:
    base = _need(root / split, f"VITON-HD {split} folder")
    parse_dir = next((base / d for d in ("image-parse-v3", "image-parse") if (base / d).is_dir()), None)
    if parse_dir is None:
        raise DatasetLayoutError(f"VITON-HD parsing maps not found (expected at {base / 'image-parse-v3'})")
    pairs = root / f"{split}_pairs.txt"
    names = _pairs(pairs) if pairs.is_file() else sorted(p.name for p in _need(base / "image", "VITON-HD images")
                                                         .glob("*.jpg"))
    for person in names:
        stem = Path(person).stem
        yield Source(f"vitonhd_{split}_{stem}", base / "image" / person, base / "cloth" / person, "upper",
                     parse_dir / f"{stem}.png", VITONHD_LABELS)


def _rgb(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.asarray(Image.open(_need(path, "image")).convert("RGB"), dtype=np.float32) / 255.0)


def _save_rgb(image: torch.Tensor, path: Path) -> None:
    Image.fromarray((image.clamp(0, 1).numpy() * 255).round().astype(np.uint8)).save(path)


def _fit(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    return fit_and_pad(image.unsqueeze(0), height, width)[0]


def crop_garment(person: torch.Tensor, mask: np.ndarray, height: int, width: int, margin: float = 0.05
                 ) -> torch.Tensor:
    """The masked region of the person photo on white, cropped to its bounding box (plus a margin), fitted and
    padded like a garment image."""
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    my, mx = int(margin * h), int(margin * w)
    y0, y1 = max(0, ys.min() - my), min(h, ys.max() + 1 + my)
    x0, x1 = max(0, xs.min() - mx), min(w, xs.max() + 1 + mx)
    m = torch.from_numpy(mask[y0:y1, x0:x1].astype(np.float32)).unsqueeze(-1)
    region = person[y0:y1, x0:x1] * m + (1 - m)
    return _fit(region, height, width)


def convert_one(src: Source, out: Path, height: int, width: int, caption: str) -> list[str]:
    """Write one sample folder; returns its slots. The person is resized to height x width (same aspect as the
    releases' 1024 x 768); the parsing map is brought to the photo's size with nearest neighbours."""
    person = _rgb(src.person)
    labels = np.asarray(Image.open(_need(src.parse, "parsing map")))
    if labels.ndim != 2:
        raise DatasetLayoutError(f"{src.parse}: a parsing map must be one channel of label indices; "
                                 f"got shape {labels.shape}")
    if labels.shape != tuple(person.shape[:2]):
        labels = np.asarray(Image.fromarray(labels).resize((person.shape[1], person.shape[0]), Image.NEAREST))
    masks = {slot: np.isin(labels, ids) for slot, ids in src.labels.items()}
    garments = {src.slot: _fit(_rgb(src.garment), height, width)}
    other = COMPLEMENT.get(src.slot)
    if other is not None and masks[other].mean() >= MIN_CROP_FRACTION:
        garments[other] = crop_garment(person, masks[other], height, width)
    tmp = out.with_name(out.name + ".tmp")  # renamed when complete: an interrupted sample is redone
    tmp.mkdir(parents=True, exist_ok=True)
    for slot, image in garments.items():
        _save_rgb(image, tmp / f"garment_{slot}.png")
        # fitted exactly like the person (no padding at the releases' 4:3), padding is not garment
        m = fit_and_pad(torch.from_numpy(masks[slot].astype(np.float32))[None, :, :, None], height, width, 0.0)
        Image.fromarray(((m[0, :, :, 0] > 0.5).numpy() * 255).astype(np.uint8)).save(tmp / f"mask_{slot}.png")
    (tmp / "caption.txt").write_text(caption)
    _save_rgb(_fit(person, height, width), tmp / "person.png")  # last: a folder with it is complete
    tmp.rename(out)
    return sorted(garments)


def convert(kind: str, root: str, out: str, split: str = "train", height: int = 768, width: int = 576,
            categories: Optional[list[str]] = None, captions: Optional[dict[str, str]] = None,
            limit: int = 0, progress: bool = False) -> dict[str, int]:
    """Convert a dataset; samples already written are skipped, so an interrupted conversion resumes."""
    root_p, out_p = Path(root), Path(out)
    if not root_p.is_dir():
        raise DatasetLayoutError(f"dataset folder not found (expected at {root_p})")
    if kind == "dresscode":
        sources = list(dresscode_sources(root_p, split, categories))
    elif kind == "vitonhd":
        sources = list(vitonhd_sources(root_p, split))
    else:
        raise DatasetLayoutError(f"unknown dataset {kind!r}; known: dresscode, vitonhd")
    if limit:
        sources = sources[:limit]
    out_p.mkdir(parents=True, exist_ok=True)
    counts = {"written": 0, "skipped": 0, "two_garments": 0}
    it = sources
    if progress:
        from tqdm import tqdm

        it = tqdm(sources, desc=f"converting {kind}", unit="sample")
    for src in it:
        target = out_p / src.name
        if (target / "person.png").is_file():
            counts["skipped"] += 1
            continue
        caption = (captions or {}).get(src.person.name, DEFAULT_CAPTION)
        slots = convert_one(src, target, height, width, caption)
        counts["written"] += 1
        counts["two_garments"] += len(slots) > 1
    return counts


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m anydressing_train.convert_dataset",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("kind", choices=("dresscode", "vitonhd"))
    ap.add_argument("root", help="the dataset's folder as released")
    ap.add_argument("out", help="the training data folder to write")
    ap.add_argument("--split", choices=("train", "test"), default="train")
    ap.add_argument("--size", default="768x576", help="H x W of the written images (default 768x576, the paper's)")
    ap.add_argument("--categories", help="DressCode categories, comma-separated (default: all present)")
    ap.add_argument("--captions", help="a JSON file mapping person image names to captions")
    ap.add_argument("--limit", type=int, default=0, help="convert only the first N samples")
    args = ap.parse_args(argv)
    try:
        height, width = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        ap.error(f"--size must be HxW, e.g. 768x576; got {args.size!r}")
    captions = json.loads(Path(args.captions).read_text()) if args.captions else None
    try:
        counts = convert(args.kind, args.root, args.out, args.split, height, width,
                         args.categories.split(",") if args.categories else None, captions, args.limit,
                         progress=True)
    except DatasetLayoutError as e:
        print(f"[AnyDressing] convert_dataset: {e}", file=sys.stderr)
        return 2
    print(f"{args.out}: {counts['written']} samples written ({counts['two_garments']} with two garments), "
          f"{counts['skipped']} already there")
    return 0


if __name__ == "__main__":
    sys.exit(main())
