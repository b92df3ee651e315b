"""Host: every shipped workflow uses registered nodes, has consistent links and passes ComfyUI's own validation.

A workflow that needs another pack is checked for structure; only ComfyUI's validation is skipped, with a line that
says which pack is missing.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from workflow_api import check_link_types, to_api

pytestmark = pytest.mark.host

WORKFLOWS = sorted((Path(__file__).resolve().parent.parent / "workflows").glob("*.json"))

# Node types of other packs our workflows use: the pack, and the signature our links rely on.
EXTERNAL = {
    "DWPreprocessor": {"pack": "comfyui_controlnet_aux", "inputs": {"image": "IMAGE"},
                       "outputs": ["IMAGE", "POSE_KEYPOINT"],
                       # test stand-ins per output, so ComfyUI can validate the rest of the graph
                       "standins": [{"class_type": "ADTestGarmentImage",
                                     "inputs": {"seed": 0, "width": 64, "height": 96}},
                                    {"class_type": "ADTestPose", "inputs": {"json": "[]"}}]},
}


class _Stub:
    """Signature of an external node, for link checking only."""

    def __init__(self, spec):
        self.RETURN_TYPES = tuple(spec["outputs"])
        self._inputs = spec["inputs"]

    def INPUT_TYPES(self):
        return {"required": {k: (v,) for k, v in self._inputs.items()}}


def test_there_is_a_multi_garment_workflow():
    multi = [p for p in WORKFLOWS if any(n["type"] == "AnyDressingEncodeGarments" and
                                         sum(1 for i in n["inputs"] if i["name"].startswith("image_") and i["link"])
                                         >= 2 for n in json.loads(p.read_text())["nodes"])]
    assert multi


def test_pose_workflow_wires_keypoints_to_masks_and_pose_image_to_openpose_controlnet():
    wf = json.loads((WORKFLOWS[0].parent / "anydressing_pose_three_garments.json").read_text())
    by_id = {n["id"]: n for n in wf["nodes"]}
    links = {(by_id[s]["type"], ss, by_id[d]["type"], by_id[d]["inputs"][ds]["name"]) for _, s, ss, d, ds, _ in
             wf["links"]}
    assert ("DWPreprocessor", 1, "AnyDressingGarmentMasks", "pose_keypoint") in links
    assert ("DWPreprocessor", 0, "ControlNetApplyAdvanced", "image") in links
    enc = next(n for n in wf["nodes"] if n["type"] == "AnyDressingEncodeGarments")
    assert sum(1 for i in enc["inputs"] if i["name"].startswith("image_") and i["link"]) == 3
    assert "openpose" in next(n for n in wf["nodes"] if n["type"] == "ControlNetLoader")["widgets_values"][0]


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.name for p in WORKFLOWS])
def test_workflow_validates_in_comfyui(host, path):
    wf = json.loads(path.read_text())
    classes = dict(host.nodes.NODE_CLASS_MAPPINGS)
    absent = sorted({n["type"] for n in wf["nodes"]} - set(classes))
    unknown = [t for t in absent if t not in EXTERNAL]
    assert unknown == [], f"node types neither registered nor known external: {unknown}"
    for t in absent:
        classes[t] = _Stub(EXTERNAL[t])
    assert check_link_types(wf, classes) == []
    assert wf["last_node_id"] == max(n["id"] for n in wf["nodes"])
    assert wf["last_link_id"] == max(link[0] for link in wf["links"])
    api = to_api({**wf, "nodes": [n for n in wf["nodes"] if n["type"] not in absent]}, classes)
    named = {(m["directory"], m["name"]) for m in wf.get("models", [])}
    for node in api.values():  # every model file a loader asks for is in the models array (missing-models dialog)
        if node["class_type"] == "CheckpointLoaderSimple":
            assert ("checkpoints", node["inputs"]["ckpt_name"]) in named
        if node["class_type"] == "ControlNetLoader":
            assert ("controlnet", node["inputs"]["control_net_name"]) in named
    # an absent external node is replaced by test stand-ins for its outputs; everything else validates for real
    ext_ids = {str(n["id"]): n["type"] for n in wf["nodes"] if n["type"] in absent}
    for nid, typ in ext_ids.items():
        for slot, standin in enumerate(EXTERNAL[typ]["standins"]):
            api[f"{nid}_{slot}"] = json.loads(json.dumps(standin))
    for node in api.values():
        for k, v in node["inputs"].items():
            if isinstance(v, list) and v and v[0] in ext_ids:
                node["inputs"][k] = [f"{v[0]}_{v[1]}", 0]
    for node in api.values():  # placeholders so combo validation sees the files; validation never opens them
        for cls, key, folder in (("CheckpointLoaderSimple", "ckpt_name", "models/checkpoints"),
                                 ("ControlNetLoader", "control_net_name", "models/controlnet"),
                                 ("LoadImage", "image", "input")):
            if node["class_type"] == cls:
                (host.base / folder).mkdir(parents=True, exist_ok=True)
                (host.base / folder / node["inputs"][key]).touch()
    valid, err, outputs, node_errors = asyncio.run(host.execution.validate_prompt("wf", api, None))
    assert valid, (err, node_errors)
    assert outputs
