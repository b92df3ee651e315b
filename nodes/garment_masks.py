"""Garment Masks: one mask per garment from user masks, boxes and pose keypoints, then grow/shrink and feather."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from comfy_api.latest import io

from ..anydressing_core.features import GarmentFeatures
from ..anydressing_core.masks import feather as feather_masks
from ..anydressing_core.masks import grow as grow_masks
from ..anydressing_core.masks import normalize_masks
from ..anydressing_core.pose import PoseError, box_mask, parse_boxes, person_keypoints, resize_keypoints, slot_region
from ..anydressing_core.slots import MAX_GARMENTS
from . import io_types
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


class GarmentMasksNode(io.ComfyNode):
    """The node: masks, boxes and a pose in, GARMENT_MASKS (and the same as a MASK batch) out."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AnyDressingGarmentMasks",
            display_name=NODE,
            category=io_types.CATEGORY,
            description="Builds one mask per garment (in Encode Garments order) from any mix of: a MASK per garment, "
                        "a box per garment, and pose keypoints from a DWPose/OpenPose preprocessor with a region rule "
                        "per slot (upper: shoulders to hips with arms; lower: hips to ankles; dress: shoulders to "
                        "knees; shoes: feet; hat: head; bag/other: mask or box only). Per garment a mask wins over a "
                        "box, a box over the pose. With masks, garment k only reaches pixels inside mask k; an "
                        "all-zero mask switches it off.",
            inputs=[
                io.Int.Input("width", default=576, min=8, max=8192, step=8,
                             tooltip="Width of the image you generate (the masks' size)."),
                io.Int.Input("height", default=768, min=8, max=8192, step=8,
                             tooltip="Height of the image you generate (the masks' size)."),
                io.Int.Input("grow", default=0, min=-512, max=512,
                             tooltip="Grow (positive) or shrink (negative) every mask by this many pixels."),
                io.Int.Input("feather", default=0, min=0, max=512,
                             tooltip="Soften mask edges over this many pixels (soft masks scale a garment's share)."),
                io.Int.Input("person_index", default=0, min=0, max=64,
                             tooltip="Which person of the pose to dress (0 = the first)."),
                io_types.GarmentFeatures.Input("garment_features", optional=True,
                                               tooltip="From Encode Garments: tells each garment's slot (for the pose "
                                                       "rules) and how many garments there are."),
                io_types.PoseKeypoint.Input("pose_keypoint", optional=True,
                                            tooltip="Keypoints from a DWPose / OpenPose preprocessor; garments without "
                                                    "a mask or box get their slot's region."),
                io.String.Input("boxes", default="", multiline=True, optional=True,
                                tooltip="One line per garment: 'x0, y0, x1, y1' in pixels (or fractions of the size "
                                        "when all are <= 1); an empty line or '-' means none."),
            ] + [io.Mask.Input(f"mask_{i}", optional=True,
                               tooltip=f"Region of garment {i} (optional; any size, it is resized to width x height).")
                 for i in range(1, MAX_GARMENTS + 1)],
            outputs=[
                io_types.GarmentMasks.Output(display_name="garment_masks",
                                             tooltip="For Apply Dressing-Attention's garment_masks input."),
                io.Mask.Output(display_name="masks", tooltip="The same masks as a MASK batch, to preview with core "
                                                             "nodes."),
            ],
        )

    @classmethod
    def execute(cls, width, height, grow, feather, person_index, garment_features=None, pose_keypoint=None,
                boxes="", **masks_in) -> io.NodeOutput:
        return io.NodeOutput(*build(width, height, grow, feather, person_index, garment_features, pose_keypoint,
                                    boxes, [masks_in.get(f"mask_{i}") for i in range(1, MAX_GARMENTS + 1)]))
