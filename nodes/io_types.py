"""The pack's custom ComfyUI types (V3 schema), defined once for every node that takes or gives them."""

from __future__ import annotations

from comfy_api.latest import io

GarmentsNet = io.Custom("GARMENTS_NET")
GarmentFeatures = io.Custom("GARMENT_FEATURES")
GarmentMasks = io.Custom("GARMENT_MASKS")
PoseKeypoint = io.Custom("POSE_KEYPOINT")  # what DWPose / OpenPose preprocessors give

CATEGORY = "AnyDressing"


def first(output) -> object:
    """The first value a node returned (an io.NodeOutput), for code that calls a node's execute directly."""
    return output.args[0]
