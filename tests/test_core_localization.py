"""Host-free: pose regions, boxes, grow/feather, attention mass A_k and the no-bleed guarantee."""

from __future__ import annotations

import math

import pytest
import torch

from anydressing_core.attention import garment_attention, garment_attention_mass
from anydressing_core.masks import feather, grow
from anydressing_core.pose import PoseError, box_mask, parse_boxes, person_keypoints, slot_region

W, H = 512, 768
# A person standing facing the camera on a 512 x 768 canvas, written by hand (OpenPose COCO-18, pixels).
PERSON = {
    0: (256, 110), 1: (256, 170), 2: (206, 175), 3: (190, 260), 4: (182, 340), 5: (306, 175), 6: (322, 260),
    7: (330, 340), 8: (226, 370), 9: (224, 500), 10: (222, 630), 11: (286, 370), 12: (288, 500), 13: (290, 630),
    14: (246, 100), 15: (266, 100), 16: (236, 108), 17: (276, 108),
}


def openpose(person=PERSON, width=W, height=H, normalized=False, people=1):
    flat = []
    for i in range(18):
        if i in person:
            x, y = person[i]
            flat += [x / width, y / height, 0.9] if normalized else [float(x), float(y), 0.9]
        else:
            flat += [0.0, 0.0, 0.0]
    return [{"people": [{"pose_keypoints_2d": flat}] * people, "canvas_width": width, "canvas_height": height}]


def region(slot, pose=None):
    kp, w, h = person_keypoints(pose or openpose())
    return slot_region(slot, kp, w, h)


def at(mask, xy):
    return float(mask[int(xy[1]), int(xy[0])])


def test_pose_regions_land_on_the_right_body_parts():
    chest = (256, 270)
    thigh = (225, 430)
    knee = PERSON[9]
    ankle = PERSON[10]
    elbow = PERSON[3]
    above_head = (256, 60)
    upper, lower, dress, shoes, hat = (region(s) for s in ("upper", "lower", "dress", "shoes", "hat"))
    assert at(upper, chest) == 1 and at(upper, elbow) == 1 and at(upper, PERSON[7]) == 1
    assert at(upper, knee) == 0 and at(upper, PERSON[0]) == 0 and at(upper, ankle) == 0
    assert at(lower, thigh) == 1 and at(lower, knee) == 1 and at(lower, ankle) == 1
    assert at(lower, chest) == 0 and at(lower, elbow) == 0
    assert at(dress, chest) == 1 and at(dress, thigh) == 1 and at(dress, knee) == 1
    assert at(dress, ankle) == 0 and at(dress, elbow) == 0
    assert at(shoes, ankle) == 1 and at(shoes, (222, 650)) == 1
    assert at(shoes, knee) == 0 and at(shoes, chest) == 0
    assert at(hat, above_head) == 1 and at(hat, PERSON[0]) == 1
    assert at(hat, chest) == 0 and at(hat, PERSON[1]) == 0
    # the regions are where the body is: the upper garment's centre of mass is on the torso
    ys, xs = torch.nonzero(upper, as_tuple=True)
    assert abs(float(xs.float().mean()) - 256) < 10 and 200 < float(ys.float().mean()) < 330


def test_normalized_coordinates_give_the_same_regions():
    assert torch.equal(region("upper"), region("upper", openpose(normalized=True)))


def test_pose_errors_say_what_is_missing():
    no_knee = {k: v for k, v in PERSON.items() if k != 12}
    with pytest.raises(PoseError, match=r"lacks the keypoints slot 'lower' needs \(hips to ankles\): left knee"):
        region("lower", openpose(no_knee))
    region("upper", openpose(no_knee))  # the upper body does not need knees
    with pytest.raises(PoseError, match="the pose has no person in it"):
        person_keypoints([{"people": [], "canvas_width": 64, "canvas_height": 64}])
    with pytest.raises(PoseError, match=r"person_index is 2 but the pose has 2 person\(s\); use 0 to 1"):
        person_keypoints(openpose(people=2), 2)
    with pytest.raises(PoseError, match="slot 'bag' has no pose rule; give it a mask or a box"):
        region("bag")


def test_boxes_grow_shrink_feather():
    assert parse_boxes("10, 20, 30, 40\n\n0.5,0,1,0.5\n-") == [(10, 20, 30, 40), None, (0.5, 0, 1, 0.5), None]
    with pytest.raises(ValueError, match="boxes line 1 '1, 2, 3' has 3 numbers"):
        parse_boxes("1, 2, 3")
    b = box_mask((10, 20, 30, 40), 64, 64)
    assert b.sum() == 400 and b[20, 10] == 1 and b[19, 10] == 0 and b[40, 10] == 0
    assert torch.equal(box_mask((0.25, 0.5, 0.5, 1.0), 64, 64), box_mask((16, 32, 32, 64), 64, 64))
    m = b.unsqueeze(0)
    assert grow(m, 2).sum() == 24 * 24 and grow(m, -2).sum() == 16 * 16
    f = feather(m, 4)
    assert f.max() <= 1 and f.min() >= 0 and abs(float(f.sum()) - 400) < 2
    assert f[0, 30, 20] == pytest.approx(1.0, abs=1e-4) and 0 < float(f[0, 20, 10]) < 1


def explicit_mass(q, keys, heads, segments, masks=None):
    """A_k with the full probability matrix: softmax over the visible garments' tokens, summed per garment."""
    b, lq, c = q.shape
    d = c // heads
    qh = q.reshape(b, lq, heads, d).transpose(1, 2).double()
    kh = keys.reshape(1, -1, heads, d).transpose(1, 2).double()
    s = qh @ kh.transpose(-1, -2) / math.sqrt(d)  # [B, h, Lq, L]
    if masks is not None:
        vis = torch.zeros(lq, s.shape[-1], dtype=torch.bool)
        for k, (a, e) in enumerate(segments):
            vis[:, a:e] = (masks[k] > 0).unsqueeze(-1)
        s = s.masked_fill(~vis, float("-inf"))
    p = torch.nan_to_num(torch.softmax(s, dim=-1), nan=0.0)
    return torch.stack([p[..., a:e].sum(-1).mean(1) for a, e in segments], dim=0)


def test_attention_mass_is_the_softmax_share_and_sums_to_one():
    g = torch.Generator().manual_seed(0)
    q, keys = torch.randn(2, 12, 16, generator=g), torch.randn(1, 9, 16, generator=g)
    segs = [(0, 4), (4, 6), (6, 9)]
    mass = garment_attention_mass(q, keys, 4, segs)
    torch.testing.assert_close(mass.double(), explicit_mass(q, keys, 4, segs), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(mass.sum(0), torch.ones(2, 12), atol=1e-6, rtol=0)
    masks = (torch.rand(3, 12, generator=g) > 0.5).float()
    masks[:, 0] = 0  # query 0 sees nothing
    mass = garment_attention_mass(q, keys, 4, segs, masks)
    torch.testing.assert_close(mass.double(), explicit_mass(q, keys, 4, segs, masks), atol=1e-6, rtol=1e-6)
    expected = (masks.sum(0) > 0).float().expand(2, -1)
    torch.testing.assert_close(mass.sum(0), expected, atol=1e-6, rtol=0)
    assert torch.all(mass[masks.unsqueeze(1).expand(-1, 2, -1) == 0] == 0)


def test_a_garment_cannot_reach_queries_outside_its_mask():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 20, 16, generator=g)
    keys, values = torch.randn(1, 10, 16, generator=g), torch.randn(1, 10, 16, generator=g)
    segs = [(0, 5), (5, 10)]
    masks = torch.ones(2, 20)
    masks[1, :12] = 0  # garment 2 only for queries 12..19
    masks[1, 15] = 0.3  # soft
    out = garment_attention(q, keys, values, 4, segs, masks=masks)
    keys2, values2 = keys.clone(), values.clone()
    keys2[:, 5:], values2[:, 5:] = torch.randn(1, 5, 16, generator=g), torch.randn(1, 5, 16, generator=g)
    out2 = garment_attention(q, keys2, values2, 4, segs, masks=masks)
    assert torch.equal(out[:, :12], out2[:, :12])  # bit-identical where garment 2 is masked out
    assert not torch.equal(out[:, 12:], out2[:, 12:])


def test_dense_bias_formulation_equals_the_per_garment_path():
    """The benchmark's alternative (one attention with a [queries x tokens] bias) computes the same thing."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    from masked_attention import dense_bias_attention

    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 30, 32, generator=g)
    keys, values = torch.randn(1, 21, 32, generator=g), torch.randn(1, 21, 32, generator=g)
    segs = [(0, 7), (7, 14), (14, 21)]
    masks = (torch.rand(3, 30, generator=g) > 0.4).float()
    masks[:, 3] = 0
    ours = garment_attention(q, keys, values, 8, segs, masks=masks)
    dense = dense_bias_attention(q, keys, values, 8, segs, masks)
    torch.testing.assert_close(ours, dense, atol=1e-5, rtol=1e-5)
