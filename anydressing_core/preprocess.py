"""Garment image preparation: any size or aspect ratio to the garment resolution GarmentsNet runs at."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def to_rgb(image: torch.Tensor) -> torch.Tensor:
    """[B, H, W, C] in [0, 1] -> RGB. Grayscale is repeated; RGBA is composited over white (garment backgrounds)."""
    c = image.shape[-1]
    if c == 3:
        return image
    if c == 1:
        return image.repeat(1, 1, 1, 3)
    if c == 4:
        rgb, alpha = image[..., :3], image[..., 3:4]
        return rgb * alpha + (1.0 - alpha)
    raise ValueError(f"garment image has {c} channels; expected 1 (gray), 3 (RGB) or 4 (RGBA)")


def fit_and_pad(image: torch.Tensor, height: int, width: int, pad_value: float = 1.0) -> torch.Tensor:
    """Scale [B, H, W, 3] to fit inside height x width keeping its aspect ratio, centre it, pad with white.

    White padding matches the flat-lay backgrounds garments are photographed on, so padding adds no garment content.
    """
    b, h, w, c = image.shape
    scale = min(height / h, width / w)
    nh, nw = max(1, min(height, round(h * scale))), max(1, min(width, round(w * scale)))
    x = image.permute(0, 3, 1, 2).float()
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=nh < h or nw < w)
    out = torch.full((b, c, height, width), float(pad_value), dtype=x.dtype)
    top, left = (height - nh) // 2, (width - nw) // 2
    out[:, :, top:top + nh, left:left + nw] = x.clamp(0.0, 1.0)
    return out.permute(0, 2, 3, 1)


def composite_mask_over_white(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Composite [B, H, W, 3] garments over white where mask is 1.

    mask follows ComfyUI's Load Image convention (1 = transparent, i.e. 1 - alpha), shaped [H, W] or [B|1, H, W];
    stock Load Image leaves the RGB of a cut-out black where it was transparent, which GarmentsNet would take as
    garment content. A mask of another size is resized to the image (bilinear), so a single mask serves any batch.
    """
    if mask.dim() == 2:
        mask = mask.unsqueeze(0)
    if mask.dim() != 3:
        raise ValueError(f"expected a MASK tensor [B, H, W]; got shape {tuple(mask.shape)}")
    if mask.shape[0] not in (1, image.shape[0]):
        raise ValueError(f"the mask batch has {mask.shape[0]} masks for {image.shape[0]} image(s); give one mask "
                         f"for all or one per image")
    m = mask.float().clamp(0.0, 1.0)
    if tuple(m.shape[1:]) != tuple(image.shape[1:3]):
        m = F.interpolate(m.unsqueeze(1), size=tuple(image.shape[1:3]), mode="bilinear", align_corners=False)[:, 0]
    m = m.unsqueeze(-1).to(image.dtype)
    return image * (1.0 - m) + m


def border_darkness(image: torch.Tensor, width: int = 2) -> float:
    """Share of border pixels (outer `width` rows and columns) that are near black, over the whole batch."""
    h, w = image.shape[1], image.shape[2]
    width = max(1, min(width, h // 2 or 1, w // 2 or 1))
    edge = torch.cat([image[:, :width].reshape(-1, image.shape[-1]), image[:, -width:].reshape(-1, image.shape[-1]),
                      image[:, :, :width].reshape(-1, image.shape[-1]),
                      image[:, :, -width:].reshape(-1, image.shape[-1])])
    return float((edge[:, :3].float().amax(dim=-1) < 0.05).float().mean())


MIN_SIDE = 64  # smaller garment images carry too little detail: scaled up to the garment resolution they encode a blur
MAX_SIDE = 4096  # larger garment photos are first thinned to this, so a huge image never costs gigabytes


def thin_huge(image: torch.Tensor, max_side: int = MAX_SIDE) -> tuple[torch.Tensor, int]:
    """Keep every s-th pixel of an image whose longer side exceeds max_side (a view: no copy of the big image)."""
    step = -(-max(image.shape[1], image.shape[2]) // max_side)
    if step <= 1:
        return image, 1
    return image[:, ::step, ::step, :], step


def prepare_garment(image: torch.Tensor, height: int, width: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Validate and convert one IMAGE batch to [B, height, width, 3] float32 in [0, 1].

    mask (optional, 1 = transparent) composites the garment over white first, at the image's own resolution.
    """
    if image.dim() != 4:
        raise ValueError(f"expected an IMAGE tensor [B, H, W, C]; got shape {tuple(image.shape)}")
    if image.shape[0] == 0:
        raise ValueError("the garment image batch is empty")
    if image.shape[1] == 0 or image.shape[2] == 0:
        raise ValueError(f"the garment image is {image.shape[2]}x{image.shape[1]} pixels")
    image, _ = thin_huge(image)
    image = image.float()
    if not bool(torch.isfinite(image).all()):
        raise ValueError("the garment image contains NaN or infinite values")
    rgb = to_rgb(image.clamp(0.0, 1.0))
    if mask is not None:
        mask, _ = thin_huge(mask.unsqueeze(-1) if mask.dim() == 3 else mask.reshape(1, *mask.shape[-2:], 1))
        rgb = composite_mask_over_white(rgb, mask[..., 0])
    return fit_and_pad(rgb, height, width)


def _stats_view(image: torch.Tensor, max_side: int = 256) -> torch.Tensor:
    """Every s-th pixel, so statistics of a huge image cost little (the checks below need no exact figures)."""
    step = max(1, -(-max(image.shape[1], image.shape[2]) // max_side))
    return image[:, ::step, ::step, :].float()


def image_warnings(image: torch.Tensor) -> list[str]:
    """What is odd about a garment IMAGE [B, H, W, C] that still encodes: said in the log, never silently.

    A gray photo (one channel, or three equal ones as Load Image makes of a grayscale PNG) gives GarmentsNet no
    colour to carry; a near-constant image (a blank, a solid fill) is almost always the wrong image connected.
    """
    x = _stats_view(image)
    if x.numel() == 0 or not bool(torch.isfinite(x).all()):
        return []
    notes = []
    c = x.shape[-1]
    if c == 1:
        notes.append("has one channel (grayscale); it is encoded as gray, so the garment's colour comes from the "
                     "prompt, not the photo")
    elif c >= 3:
        rgb = x[..., :3]
        spread = float((rgb.amax(dim=-1) - rgb.amin(dim=-1)).max())
        if spread <= 1.0 / 255:
            notes.append("has no colour (all three channels are equal: a grayscale photo); the garment's colour "
                         "comes from the prompt, not the photo")
    flat = x[..., :3].reshape(x.shape[0], -1, min(c, 3)).std(dim=1).amax(dim=-1)  # per image, brightest channel
    if float(flat.min()) < 0.01:
        notes.append(f"is nearly one flat colour (pixel standard deviation {float(flat.min()):.4f}); check that the "
                     f"garment photo, not a blank or solid image, is connected")
    return notes
