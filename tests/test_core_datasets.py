"""Host-free: the DressCode and VITON-HD converters on tiny datasets written in the releases' exact layouts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anydressing_train.convert_dataset import DatasetLayoutError, convert, main
from anydressing_train.data import FolderDataset

H, W = 64, 48  # 4:3 like the releases' 1024 x 768
SKIN, TOP, BOTTOM = (220, 180, 150), (200, 30, 30), (30, 30, 200)


def labels_map(upper: int, lower: int) -> np.ndarray:
    """Rows 8-31: upper label; rows 32-59: lower label; a background border (blocks aligned to even pixels)."""
    lab = np.zeros((H, W), np.uint8)
    lab[8:32, 8:40] = upper
    lab[32:60, 12:36] = lower
    return lab


def save_palette(lab: np.ndarray, path: Path) -> None:
    img = Image.fromarray(lab, mode="P")
    img.putpalette([v for i in range(256) for v in ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256)])
    img.save(path)


def person_photo(lab: np.ndarray, upper_ids, lower_ids) -> np.ndarray:
    img = np.full((H, W, 3), SKIN, np.uint8)
    img[np.isin(lab, upper_ids)] = TOP
    img[np.isin(lab, lower_ids)] = BOTTOM
    return img


def flat_lay(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.full((H, W, 3), 255, np.uint8)
    img[10:54, 8:40] = rng.integers(0, 255, 3)
    return img


def write_dresscode(root: Path) -> None:
    for cat, (upper, lower), ids in (("upper_body", (4, 6), ["013563", "013564"]),
                                     ("lower_body", (4, 5), ["050001"]),
                                     ("dresses", (7, 7), ["020001"])):
        base = root / cat
        (base / "images").mkdir(parents=True)
        (base / "label_maps").mkdir()
        for i, stem in enumerate(ids):
            lab = labels_map(upper, lower)
            Image.fromarray(person_photo(lab, (4, 7), (5, 6))).save(base / "images" / f"{stem}_0.jpg", quality=95)
            Image.fromarray(flat_lay(i)).save(base / "images" / f"{stem}_1.jpg", quality=95)
            save_palette(lab, base / "label_maps" / f"{stem}_4.png")
        (base / "train_pairs.txt").write_text("".join(f"{s}_0.jpg {s}_1.jpg\n" for s in ids))


def expected_mask(lab: np.ndarray, ids, size=(32, 24)) -> np.ndarray:
    m = np.isin(lab, ids).astype(np.float32)
    return m.reshape(size[0], H // size[0], size[1], W // size[1]).mean(axis=(1, 3)) > 0.5


def read(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_dresscode_flat_lay_plus_the_complementary_garment_cropped_from_the_person(tmp_path):
    write_dresscode(tmp_path / "DressCode")
    counts = convert("dresscode", str(tmp_path / "DressCode"), str(tmp_path / "out"), height=32, width=24)
    assert counts == {"written": 4, "skipped": 0, "two_garments": 3}
    ds = FolderDataset(str(tmp_path / "out"))
    names = [p.name for p in ds.items]
    assert names == ["dresscode_dresses_020001", "dresscode_lower_body_050001", "dresscode_upper_body_013563",
                     "dresscode_upper_body_013564"]
    by_name = {n: ds[i] for i, n in enumerate(names)}
    assert sorted(by_name["dresscode_upper_body_013563"].garments) == ["lower", "upper"]
    assert sorted(by_name["dresscode_dresses_020001"].garments) == ["dress"]
    s = by_name["dresscode_upper_body_013563"]
    assert s.person.shape == (32, 24, 3) and s.garments["upper"].shape == (32, 24, 3)
    lab = labels_map(4, 6)
    assert np.array_equal(s.masks["upper"].numpy() > 0.5, expected_mask(lab, (4,)))
    assert np.array_equal(s.masks["lower"].numpy() > 0.5, expected_mask(lab, (5, 6)))
    # the flat-lay garment is the release's <id>_1.jpg, scaled
    src = np.asarray(Image.open(tmp_path / "DressCode/upper_body/images/013563_1.jpg").convert("RGB"), np.float32)
    got = s.garments["upper"].numpy() * 255
    assert abs(float(got[16, 12].mean()) - float(src[32, 24].mean())) < 12
    # the lower garment is the person's trousers on white: blue, white and their blends, no skin, no top
    crop = read(tmp_path / "out/dresscode_upper_body_013563/garment_lower.png")
    near = {name: np.abs(crop - np.array(c)).max(axis=-1) < 40 for name, c in
            (("blue", BOTTOM), ("skin", SKIN), ("top", TOP))}
    assert near["blue"].mean() > 0.3 and not near["skin"].any() and not near["top"].any()
    assert (crop.min(axis=-1) > 215).mean() > 0.2  # on white
    # a lower-body sample crops the upper garment instead
    crop_up = read(tmp_path / "out/dresscode_lower_body_050001/garment_upper.png")
    assert (np.abs(crop_up - TOP).max(axis=-1) < 40).mean() > 0.3


def test_conversion_resumes_and_skips_finished_samples(tmp_path):
    write_dresscode(tmp_path / "DressCode")
    out = tmp_path / "out"
    convert("dresscode", str(tmp_path / "DressCode"), str(out), height=32, width=24, categories=["upper_body"],
            limit=1)
    (out / "dresscode_upper_body_013564.tmp").mkdir()  # a sample interrupted half-way: redone
    counts = convert("dresscode", str(tmp_path / "DressCode"), str(out), height=32, width=24,
                     categories=["upper_body"])
    assert counts == {"written": 1, "skipped": 1, "two_garments": 1}
    assert sorted(p.name for p in out.iterdir()) == ["dresscode_upper_body_013563", "dresscode_upper_body_013564"]


def test_vitonhd_paired_mode_takes_the_garment_of_the_first_column(tmp_path):
    root = tmp_path / "zalando-hd-resized"
    for d in ("image", "cloth", "image-parse-v3"):
        (root / "train" / d).mkdir(parents=True)
    for i, stem in enumerate(["10224_00", "03195_00"]):
        lab = labels_map(5, 9 if i == 0 else 12)
        Image.fromarray(person_photo(lab, (5, 7), (9, 12))).save(root / "train/image" / f"{stem}.jpg", quality=95)
        Image.fromarray(flat_lay(10 + i)).save(root / "train/cloth" / f"{stem}.jpg", quality=95)
        save_palette(lab, root / "train/image-parse-v3" / f"{stem}.png")
    # the release's training pairs name another garment in the second column; paired mode ignores it
    (root / "train_pairs.txt").write_text("10224_00.jpg 03195_00.jpg\n03195_00.jpg 10224_00.jpg\n")
    counts = convert("vitonhd", str(root), str(tmp_path / "out"), height=32, width=24)
    assert counts["written"] == 2 and counts["two_garments"] == 2
    s = FolderDataset(str(tmp_path / "out"))[1]  # vitonhd_train_10224_00
    assert np.array_equal(s.masks["lower"].numpy() > 0.5, expected_mask(labels_map(5, 9), (9, 12)))
    own = np.asarray(Image.open(root / "train/cloth/10224_00.jpg").convert("RGB"), np.float32)[32, 24]
    assert np.abs(s.garments["upper"].numpy()[16, 12] * 255 - own).max() < 12


def test_layout_errors_name_the_expected_path(tmp_path, capsys):
    with pytest.raises(DatasetLayoutError, match=r"dataset folder not found \(expected at .*nowhere\)"):
        convert("dresscode", str(tmp_path / "nowhere"), str(tmp_path / "out"))
    (tmp_path / "DressCode" / "upper_body").mkdir(parents=True)
    with pytest.raises(DatasetLayoutError, match=r"DressCode upper_body pairs file not found \(expected at "
                                                  r".*upper_body/train_pairs.txt\)"):
        convert("dresscode", str(tmp_path / "DressCode"), str(tmp_path / "out"))
    (tmp_path / "viton" / "train").mkdir(parents=True)
    assert main(["vitonhd", str(tmp_path / "viton"), str(tmp_path / "out")]) == 2
    assert ("[AnyDressing] convert_dataset: VITON-HD parsing maps not found (expected at "
            f"{tmp_path / 'viton' / 'train' / 'image-parse-v3'})") in capsys.readouterr().err
