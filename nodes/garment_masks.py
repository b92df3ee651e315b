"""Garment Masks: one mask per garment from user masks, boxes and pose keypoints, then grow/shrink and feather."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F

from ..anydressing_core.features import GarmentFeatures
from ..anydressing_core.masks import feather as feather_masks
from ..anydressing_core.masks import grow as grow_masks
from ..anydressing_core.masks import normalize_masks
from ..anydressing_core.pose import PoseError, box_mask, parse_boxes, person_keypoints, resize_keypoints, slot_region
from .glue import NodeError

NODE = "Garment Masks"


@dataclass
class GarmentMasks:
    """GARMENT_MASKS: one [H, W] mask per garment, in Encode Garments order, values in [0, 1]."""

    masks: torch.Tensor  # [N, H, W] float32

    def __deepcopy__(self, memo):
        return self


def same_aspect(w1: int, h1: int, w2: int, h2: int) -> bool:
    """Equal aspect ratios up to one pixel of rounding on the smaller image (so 1000x1333 matches 576x768)."""
    if min(w1, h1, w2, h2) <= 0:
        return False
    big_w, big_h = max((w1, h1), (w2, h2), key=lambda size: size[0] * size[1])
    # |w_small - w_big * h_small / h_big| <= 1, or the same for the heights, without the divisions
    return abs(w1 * h2 - w2 * h1) <= max(big_w, big_h)


def _user_mask(mask: torch.Tensor, index: int, width: int, height: int) -> torch.Tensor:
    m = mask if mask.dim() == 3 else mask.unsqueeze(0)
    if m.shape[0] != 1:
        raise NodeError(NODE, f"mask_{index} holds {m.shape[0]} masks; connect one mask per garment input")
    try:
        m = normalize_masks(m)
    except ValueError as e:
        raise NodeError(NODE, f"mask_{index}: {e}; fix the mask that feeds it") from None
    mh, mw = int(m.shape[-2]), int(m.shape[-1])
    if not same_aspect(mw, mh, width, height):
        raise NodeError(NODE, f"mask_{index} is {mw}x{mh} pixels (aspect {mw / mh:.3f}) but the masks are made at "
                              f"width x height = {width}x{height} (aspect {width / height:.3f}); stretching it would "
                              f"move the garment's region: set width and height to the size of the image the mask "
                              f"was drawn on, or crop the mask to {width}x{height}'s aspect first")
    if m.shape[-2:] != (height, width):
        m = F.interpolate(m.unsqueeze(1), size=(height, width), mode="bilinear", align_corners=False).squeeze(1)
    return m[0]


def build(width: int, height: int, grow: int, feather: int, person_index: int,
          features: Optional[GarmentFeatures], pose: Any, boxes_text: str,
          masks: list[Optional[torch.Tensor]]) -> tuple[GarmentMasks, torch.Tensor]:
    try:
        boxes = parse_boxes(boxes_text)
    except ValueError as e:
        raise NodeError(NODE, str(e)) from None
    given = [i for i, m in enumerate(masks) if m is not None]
    if features is not None:
        count, slots = features.count, list(features.slots)
    else:
        count = max([i + 1 for i in given] + [len(boxes)] + [0])
        slots = [None] * count
    if count == 0:
        raise NodeError(NODE, "no garment to build a mask for: connect masks, write boxes, or connect "
                              "garment_features with pose_keypoint")
    too_many = [i + 1 for i in given if i >= count]
    if too_many or len(boxes) > count:
        raise NodeError(NODE, f"masks or boxes are given for {max(too_many + [len(boxes)])} garments but "
                              f"garment_features has {count}; remove the extra ones")
    kp = None
    out = []
    for k in range(count):
        if k < len(masks) and masks[k] is not None:
            out.append(_user_mask(masks[k], k + 1, width, height))
            continue
        if k < len(boxes) and boxes[k] is not None:
            out.append(box_mask(boxes[k], width, height))
            continue
        slot = slots[k]
        if pose is None or slot is None:
            need = "" if slot is None else f" ({slot})"
            raise NodeError(NODE, f"garment {k + 1}{need} has no mask, box or pose region: connect mask_{k + 1}, "
                                  f"add line {k + 1} to boxes, or connect pose_keypoint and garment_features")
        try:
            if kp is None:
                raw, cw, ch = person_keypoints(pose, person_index)
                kp = resize_keypoints(raw, (cw, ch), (width, height))
            out.append(slot_region(slot, kp, width, height))
        except PoseError as e:
            raise NodeError(NODE, f"garment {k + 1} ({slot}): {e}") from None
    stacked = torch.stack(out, dim=0).float()
    stacked = feather_masks(grow_masks(stacked, grow), feather)
    return GarmentMasks(stacked), stacked
