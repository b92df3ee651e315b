"""Garment regions from OpenPose keypoints (the POSE_KEYPOINT that DWPose / OpenPose preprocessors output).

POSE_KEYPOINT is a list of frames: {"people": [{"pose_keypoints_2d": [x, y, confidence] * 18, ...}],
"canvas_width": W, "canvas_height": H}. Coordinates are pixels of the canvas (normalised [0, 1] values are accepted
too). Body keypoints follow the COCO-18 order used by OpenPose.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

BODY = ("nose", "neck", "right shoulder", "right elbow", "right wrist", "left shoulder", "left elbow", "left wrist",
        "right hip", "right knee", "right ankle", "left hip", "left knee", "left ankle", "right eye", "left eye",
        "right ear", "left ear")
NOSE, NECK, R_SHO, R_ELB, R_WRI, L_SHO, L_ELB, L_WRI, R_HIP, R_KNE, R_ANK, L_HIP, L_KNE, L_ANK = range(14)

# Keypoints each slot's region rule cannot do without (arms, eyes and ears refine a region when present).
REQUIRED: dict[str, tuple[int, ...]] = {
    "upper": (R_SHO, L_SHO, R_HIP, L_HIP),
    "lower": (R_HIP, L_HIP, R_KNE, L_KNE, R_ANK, L_ANK),
    "dress": (R_SHO, L_SHO, R_HIP, L_HIP, R_KNE, L_KNE),
    "shoes": (R_ANK, L_ANK),
    "hat": (NOSE,),
}
RULES_TEXT = {
    "upper": "shoulders to hips, with the arms",
    "lower": "hips to ankles",
    "dress": "shoulders to knees",
    "shoes": "the feet",
    "hat": "the head",
}


class PoseError(ValueError):
    pass


def person_keypoints(pose: Any, person: int = 0, frame: int = 0) -> tuple[torch.Tensor, int, int]:
    """[18, 3] (x, y, confidence) in canvas pixels for one person, plus the canvas (width, height)."""
    frames = pose if isinstance(pose, list) else [pose]
    if not frames:
        raise PoseError("the pose input is empty")
    data = frames[min(frame, len(frames) - 1)]
    people = data.get("people") or []
    if not people:
        raise PoseError("the pose has no person in it")
    if person >= len(people):
        raise PoseError(f"person_index is {person} but the pose has {len(people)} person(s); use 0 to "
                        f"{len(people) - 1}")
    width, height = int(data.get("canvas_width", 0) or 0), int(data.get("canvas_height", 0) or 0)
    raw = people[person].get("pose_keypoints_2d") or []
    if len(raw) < 18 * 3:
        raw = list(raw) + [0.0] * (18 * 3 - len(raw))
    kp = torch.tensor(raw[:54], dtype=torch.float32).reshape(18, 3)
    present = kp[:, 2] > 0
    if present.any() and float(kp[present, :2].max()) <= 1.0:  # normalised coordinates
        kp[:, 0] *= max(width, 1)
        kp[:, 1] *= max(height, 1)
    if width <= 0 or height <= 0:
        if not present.any():
            raise PoseError("the pose has no canvas size and no keypoints")
        width = int(math.ceil(float(kp[present, 0].max()) + 1))
        height = int(math.ceil(float(kp[present, 1].max()) + 1))
    return kp, width, height


def missing_for(slot: str, kp: torch.Tensor) -> list[str]:
    return [BODY[i] for i in REQUIRED.get(slot, ()) if float(kp[i, 2]) <= 0]


def _grid(height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    ys = torch.arange(height, dtype=torch.float32).view(-1, 1).expand(height, width) + 0.5
    xs = torch.arange(width, dtype=torch.float32).view(1, -1).expand(height, width) + 0.5
    return xs, ys


def capsule(xs, ys, a, b, radius: float) -> torch.Tensor:
    """Pixels within `radius` of the segment a-b."""
    ax, ay, bx, by = float(a[0]), float(a[1]), float(b[0]), float(b[1])
    dx, dy = bx - ax, by - ay
    length2 = dx * dx + dy * dy
    if length2 == 0:
        t = torch.zeros_like(xs)
    else:
        t = (((xs - ax) * dx + (ys - ay) * dy) / length2).clamp(0, 1)
    px, py = ax + t * dx, ay + t * dy
    return ((xs - px) ** 2 + (ys - py) ** 2) <= radius * radius


def polygon(xs, ys, points) -> torch.Tensor:
    """Pixels inside a polygon (even-odd rule)."""
    inside = torch.zeros_like(xs, dtype=torch.bool)
    n = len(points)
    for i in range(n):
        x1, y1 = float(points[i][0]), float(points[i][1])
        x2, y2 = float(points[(i + 1) % n][0]), float(points[(i + 1) % n][1])
        if y1 == y2:
            continue
        crosses = (ys >= min(y1, y2)) & (ys < max(y1, y2))
        x_at = x1 + (ys - y1) * (x2 - x1) / (y2 - y1)
        inside ^= crosses & (xs < x_at)
    return inside


def slot_region(slot: str, kp: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """[height, width] float mask of the region a slot's garment covers, from one person's keypoints."""
    if slot not in REQUIRED:
        raise PoseError(f"slot {slot!r} has no pose rule; give it a mask or a box")
    missing = missing_for(slot, kp)
    if missing:
        raise PoseError(f"the pose lacks the keypoints slot {slot!r} needs ({RULES_TEXT[slot]}): "
                        f"{', '.join(missing)}")
    xs, ys = _grid(height, width)
    p = kp[:, :2]
    ok = kp[:, 2] > 0
    shoulder_w = float(torch.dist(p[R_SHO], p[L_SHO])) if ok[R_SHO] and ok[L_SHO] else 0.0
    hip_w = float(torch.dist(p[R_HIP], p[L_HIP])) if ok[R_HIP] and ok[L_HIP] else 0.0
    scale = max(shoulder_w, hip_w * 1.3, 4.0)
    region = torch.zeros((height, width), dtype=torch.bool)

    def limb(chain, radius):
        nonlocal region
        pts = [i for i in chain if ok[i]]
        for a, b in zip(pts, pts[1:]):
            region |= capsule(xs, ys, p[a], p[b], radius)

    if slot in ("upper", "dress"):
        torso = [p[R_SHO], p[L_SHO], p[L_HIP], p[R_HIP]]
        region |= polygon(xs, ys, torso)
        region |= capsule(xs, ys, p[R_SHO], p[L_SHO], 0.18 * scale)
        region |= capsule(xs, ys, p[R_HIP], p[L_HIP], 0.15 * scale)
        for side in ((R_SHO, R_HIP), (L_SHO, L_HIP)):
            region |= capsule(xs, ys, p[side[0]], p[side[1]], 0.12 * scale)
        if slot == "upper":
            limb((R_SHO, R_ELB, R_WRI), 0.16 * scale)
            limb((L_SHO, L_ELB, L_WRI), 0.16 * scale)
    if slot == "dress":
        skirt = [p[R_HIP], p[L_HIP], p[L_KNE], p[R_KNE]]
        region |= polygon(xs, ys, skirt)
        limb((R_HIP, R_KNE), 0.22 * scale)
        limb((L_HIP, L_KNE), 0.22 * scale)
    if slot == "lower":
        region |= capsule(xs, ys, p[R_HIP], p[L_HIP], 0.2 * scale)
        region |= polygon(xs, ys, [p[R_HIP], p[L_HIP], p[L_KNE], p[R_KNE]])
        limb((R_HIP, R_KNE, R_ANK), 0.2 * scale)
        limb((L_HIP, L_KNE, L_ANK), 0.2 * scale)
    if slot == "shoes":
        for ankle, knee in ((R_ANK, R_KNE), (L_ANK, L_KNE)):
            centre = p[ankle].clone()
            if ok[knee]:
                centre = centre + 0.25 * (p[ankle] - p[knee])  # feet sit below the ankle, along the shin
            region |= capsule(xs, ys, p[ankle], centre, 0.16 * scale)
    if slot == "hat":
        head = [i for i in (NOSE, 14, 15, 16, 17) if ok[i]]
        centre = p[head].mean(dim=0)
        ears = [i for i in (16, 17) if ok[i]]
        head_w = float(torch.dist(p[16], p[17])) if len(ears) == 2 else 0.5 * scale
        top = centre.clone()
        top[1] -= 0.9 * head_w
        region |= capsule(xs, ys, centre - torch.tensor([0.0, 0.2 * head_w]), top, 0.65 * head_w)
    return region.float()


def resize_keypoints(kp: torch.Tensor, from_wh: tuple[int, int], to_wh: tuple[int, int]) -> torch.Tensor:
    out = kp.clone()
    out[:, 0] *= to_wh[0] / max(from_wh[0], 1)
    out[:, 1] *= to_wh[1] / max(from_wh[1], 1)
    return out


def box_mask(box: tuple[float, float, float, float], width: int, height: int) -> torch.Tensor:
    """A box in pixels, or in fractions of the size when all values are <= 1."""
    x0, y0, x1, y1 = box
    if max(abs(v) for v in box) <= 1.0:
        x0, x1, y0, y1 = x0 * width, x1 * width, y0 * height, y1 * height
    xs, ys = _grid(height, width)
    return ((xs >= min(x0, x1)) & (xs < max(x0, x1)) & (ys >= min(y0, y1)) & (ys < max(y0, y1))).float()


def parse_boxes(text: str) -> list[Optional[tuple[float, float, float, float]]]:
    """One line per garment: 'x0, y0, x1, y1' (pixels, or fractions when all <= 1); an empty line or '-' = none."""
    boxes: list[Optional[tuple[float, float, float, float]]] = []
    for i, line in enumerate((text or "").strip("\n").splitlines(), start=1):
        line = line.strip()
        if not line or line == "-":
            boxes.append(None)
            continue
        try:
            values = [float(v) for v in line.replace(";", ",").split(",")]
        except ValueError:
            raise ValueError(f"boxes line {i} {line!r} is not 'x0, y0, x1, y1'") from None
        if len(values) != 4:
            raise ValueError(f"boxes line {i} {line!r} has {len(values)} numbers; expected 'x0, y0, x1, y1'")
        boxes.append((values[0], values[1], values[2], values[3]))
    return boxes
