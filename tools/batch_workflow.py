"""The workflow side of batch dressing: the option overrides, the checkpoint choice, ComfyUI's validation as lines,
and one outfit's prompt. Pure functions on API-format prompts: no ComfyUI, no server."""

from __future__ import annotations

import argparse
import json
from typing import Callable, Optional

from anydressing_core.slots import MAX_GARMENTS
from anydressing_core.workflow_api import MODE_BYPASSED, MODE_MUTED

from batch_outfits import Outfit

ENCODE = "AnyDressingEncodeGarments"

# option -> (node types it must find, further node types it also sets, the inputs set on all of them)
OVERRIDES = {
    "checkpoint": (("CheckpointLoaderSimple",), (), ("ckpt_name",)),
    "width": (("EmptyLatentImage",), ("AnyDressingGarmentMasks",), ("width",)),
    "height": (("EmptyLatentImage",), ("AnyDressingGarmentMasks",), ("height",)),
    "steps": (("KSampler", "KSamplerAdvanced"), (), ("steps",)),
    "cfg": (("KSampler", "KSamplerAdvanced"), (), ("cfg",)),
    "sampler": (("KSampler", "KSamplerAdvanced"), (), ("sampler_name",)),
    "strength": (("AnyDressingApplyDressingAttention",), (), ("strength",)),
    "garments_net": (("AnyDressingLoadGarmentsNet",), (), ("garments_net_name",)),
    "garment_size": ((ENCODE,), (), ("width", "height")),
}


def linked_node(ref) -> Optional[str]:
    """The node id a linked input ([node id, output index]) comes from; None for a widget value."""
    return ref[0] if isinstance(ref, list) else None


def workflow_node_types(workflow: dict) -> set[str]:
    """The node types that will run (UI format: muted and bypassed nodes left out; API format: all)."""
    if "nodes" in workflow:
        return {n["type"] for n in workflow["nodes"] if n.get("mode") not in (MODE_MUTED, MODE_BYPASSED)}
    return {n.get("class_type") for n in workflow.values() if isinstance(n, dict)}


def check_overrides(args: argparse.Namespace, types: set[str], workflow_name: str) -> None:
    """Every option given must have a node to set: say which option and which node is missing, before starting."""
    for key, (needed, _, _) in OVERRIDES.items():
        if getattr(args, key) is not None and not types & set(needed):
            option = "--" + key.replace("_", "-")
            raise SystemExit(f"{option}: the workflow {workflow_name} has no {' or '.join(needed)} node to set; "
                             f"drop {option} or use a workflow that has one")
    if ENCODE not in types:
        raise SystemExit(f"the workflow {workflow_name} has no Encode Garments ({ENCODE}) node")


def parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 576x768, got {text!r}")
    return w, h


def apply_overrides(api: dict, args: argparse.Namespace) -> None:
    """Set the options given on every node they name (the checkpoint is resolved separately)."""
    for key, (needed, also, names) in OVERRIDES.items():
        value = getattr(args, key)
        if value is None or key == "checkpoint":
            continue
        values = value if key == "garment_size" else (value,) * len(names)
        for node in api.values():
            if node["class_type"] in needed + also:
                node["inputs"].update(dict(zip(names, values)))


def resolve_checkpoint(api: dict, wanted: Optional[str], available: list[str]) -> list[str]:
    """--checkpoint on every CheckpointLoaderSimple; without it, a checkpoint the workflow names but that is not
    installed becomes the first one found. Returns the lines to tell the user."""
    loaders = [n for n in api.values() if n["class_type"] == "CheckpointLoaderSimple"]
    if wanted is not None:
        if wanted not in available:
            raise SystemExit(f"--checkpoint {wanted}: not in ComfyUI's models/checkpoints (found: "
                             f"{', '.join(available) or 'none'})")
        for n in loaders:
            n["inputs"]["ckpt_name"] = wanted
        return []
    said = []
    for n in loaders:
        name = n["inputs"].get("ckpt_name")
        if name in available:
            continue
        if not available:
            raise SystemExit(f"the workflow's checkpoint {name} is not in ComfyUI's models/checkpoints and no other "
                             "checkpoint is there: put an SD1.5 checkpoint there (or pass --checkpoint NAME)")
        n["inputs"]["ckpt_name"] = available[0]
        said.append(f"the workflow's checkpoint {name} is not in models/checkpoints; using {available[0]}, the first "
                    "one found (choose with --checkpoint NAME)")
    return said


def validation_lines(api: dict, error: Optional[dict], node_errors: dict,
                     choices_of: Optional[Callable[[str, str], list]] = None) -> list[str]:
    """ComfyUI's validation result as one line per problem: node, input, reason. choices_of(class_type, input)
    gives a combo's choices, so a value not in a long list is answered with the list (ComfyUI only says its length).
    """
    lines = []
    for nid, ne in node_errors.items():
        ct = ne.get("class_type") or api.get(nid, {}).get("class_type")
        title = api.get(nid, {}).get("_meta", {}).get("title") or ct
        label = f"node {nid} ({title})" if title == ct else f"node {nid} ({title}, {ct})"
        for e in ne.get("errors", []):
            extra = e.get("extra_info") or {}
            where = extra.get("input_name")
            if e.get("type") == "value_not_in_list" and choices_of is not None and where:
                options = [str(o) for o in choices_of(ct, where)]
                shown = ", ".join(options[:30]) + (f", ... ({len(options)} in all)" if len(options) > 30 else "")
                reason = f"{extra.get('received_value')!r} is not one of: {shown}"
            else:
                details = str(e.get("details") or "")
                details = details if len(details) <= 400 else details[:400] + "..."
                reason = str(e.get("message")) + (f": {details}" if details else "")
            lines.append(f"{label}, input {where or '-'}: {reason}")
    if not lines and error:
        lines.append(f"{error.get('message')}: {error.get('details')}")
    return lines


def result_nodes(api: dict) -> list[str]:
    """The workflow's SaveImage nodes: their images are the outfit's result."""
    return [nid for nid, n in api.items() if n["class_type"] == "SaveImage"]


def prepare(api: dict, outfit: Outfit, images: dict[str, str]) -> dict:
    """The workflow with this outfit's garments (`images`: slot -> the name the server's LoadImage takes), prompts
    and seed. Its SaveImage nodes become PreviewImage: the server keeps nothing in its output folder, the images come
    back through /view and the command saves them.

    The outfit's garments replace the workflow's: its garment loaders (placeholders such as garment_upper.png) are
    removed, and where the workflow took garment masks from its Load Image nodes (the alpha), the outfit's garments
    give theirs the same way."""
    p = json.loads(json.dumps(api))
    encode_id = next((k for k, v in p.items() if v["class_type"] == ENCODE), None)
    if encode_id is None:
        raise SystemExit("the workflow has no Encode Garments node")
    enc = p[encode_id]["inputs"]
    slots_in = range(1, MAX_GARMENTS + 1)
    replaced = {ref[0] for i in slots_in for ref in (enc.get(f"image_{i}"), enc.get(f"mask_{i}"))
                if isinstance(ref, list)}
    alpha_masks = any(isinstance(enc.get(f"mask_{i}"), list) and enc[f"mask_{i}"][1] == 1 and
                      p.get(enc[f"mask_{i}"][0], {}).get("class_type") == "LoadImage" for i in slots_in)
    for i in slots_in:
        enc.pop(f"image_{i}", None)
        enc.pop(f"mask_{i}", None)
    for i, (slot, name) in enumerate(images.items(), start=1):
        nid = f"batch_{slot}"
        p[nid] = {"class_type": "LoadImage", "inputs": {"image": name}, "_meta": {"title": f"{slot} garment"}}
        enc[f"image_{i}"] = [nid, 0]
        enc[f"slot_{i}"] = slot
        if alpha_masks:
            enc[f"mask_{i}"] = [nid, 1]
    used = {ref[0] for node in p.values() for ref in node["inputs"].values() if isinstance(ref, list)}
    for nid in replaced - used:  # the workflow's own garment loaders, now unused
        if p.get(nid, {}).get("class_type") == "LoadImage":
            del p[nid]
    for node in p.values():
        ct, ins = node["class_type"], node["inputs"]
        if ct in ("KSampler", "KSamplerAdvanced"):
            ins["seed" if "seed" in ins else "noise_seed"] = outfit.seed
            for key, text in (("positive", outfit.prompt), ("negative", outfit.negative)):
                src = linked_node(ins.get(key))
                if text and src in p and p[src]["class_type"] == "CLIPTextEncode":
                    p[src]["inputs"]["text"] = text
        if ct == "SaveImage":
            node["class_type"] = "PreviewImage"
            node["inputs"] = {"images": ins["images"]}
    return p
