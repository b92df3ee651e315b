"""docs/attention_maps.png: Garment Attention Maps' overlays from a real run of the nodes, on the tests' tiny
SD1.5-layout model with **random weights** (no trained weights exist here), so the picture shows what the node gives,
not what a trained model localizes: without masks the two garments share every pixel; with Garment Masks (the upper
garment in the top half, the lower one in the bottom half) each stays in its box.

    python bench/attention_maps_picture.py        # boots the tests' pinned ComfyUI in this process, writes the PNG
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "tests"), str(REPO / "tests" / "fixture_pack"), str(REPO)]


def main() -> None:
    import numpy as np
    from PIL import Image, ImageDraw

    import graphs
    import host as test_host

    h = test_host.boot()
    import adtest_tiny

    rows = []
    for label, masks in (("no masks", None), ("Garment Masks: upper top, lower bottom",
                                              [(0, 0, 1, 0.5, 1.0), (0, 0.5, 1, 1, 1.0)])):
        p = graphs.dressing_prompt(masks=masks, latent_w=256, latent_h=256, steps=4, capture_key="picture")
        p["maps"] = {"class_type": "AnyDressingGarmentAttentionMaps",
                     "inputs": {"model": ["apply", 0], "positive": ["pos", 0], "latent": ["sampler", 0],
                                "at_percent": 0.5, "seed": 3, "batch_index": 0}}
        p["cap"] = {"class_type": "ADTestCaptureMask", "inputs": {"key": "maps", "mask": ["maps", 1],
                                                                  "image": ["maps", 0]}}
        r = h.run(p)
        if not r["success"]:
            raise SystemExit(r["errors"])
        overlays = adtest_tiny.STORE["maps_image"]  # [2, H, W, 3]
        tiles = [Image.fromarray((overlays[k].numpy() * 255).astype(np.uint8)) for k in range(overlays.shape[0])]
        rows.append((label, tiles))
    size = rows[0][1][0].size[0]
    pad, head = 8, 22
    sheet = Image.new("RGB", (2 * size + 3 * pad, len(rows) * (size + head + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for r_i, (label, tiles) in enumerate(rows):
        y = pad + r_i * (size + head + pad)
        draw.text((pad, y + 4), f"{label}: upper (red), lower (blue); random weights", fill="black")
        for k, tile in enumerate(tiles):
            sheet.paste(tile, (pad + k * (size + pad), y + head))
    out = REPO / "docs" / "attention_maps.png"
    sheet.save(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
