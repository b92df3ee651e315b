"""Convert a ComfyUI UI-format workflow (what the editor saves) to API format (what /prompt and the executor take).

Plain Python, no ComfyUI import: the node definitions come either from node classes (NODE_CLASS_MAPPINGS of a
booted ComfyUI, via `to_api`) or from a running server's /object_info JSON (via `to_api_from_object_info`), so the
batch command, `tools/workflow_to_api.py` and the tests share one converter.

What the editor does when it queues a graph, and so what this does:
  * widget values are stored positionally in `widgets_values`, in the order of the node's inputs (required, then
    optional); a seed-like widget (`control_after_generate`, or an INT named seed/noise_seed) is followed by its
    control value ("fixed", "randomize", ...), which is not an input; an upload combo may be followed by the
    upload button's value;
  * a linked input (including a widget converted to an input) takes the link, not the stored value;
  * frontend-only nodes vanish: Reroute passes its input through, PrimitiveNode gives its value to the widgets it
    feeds, Note/MarkdownNote are dropped;
  * muted nodes (mode 2) are dropped with their links; bypassed nodes (mode 4) are dropped and each link from one
    of their outputs is taken from the input of the same type (same slot first, else the first such input).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
UPLOAD_OPTIONS = ("image_upload", "video_upload", "audio_upload", "animated_image_upload")
DROPPED_TYPES = {"Note", "MarkdownNote"}
MODE_MUTED, MODE_BYPASSED = 2, 4


class WorkflowError(ValueError):
    """The workflow cannot be converted (unknown node types, a subgraph, a broken link); the message says the fix."""


def is_widget(spec) -> bool:
    """A widget input: a combo (list of choices or COMBO) or a primitive type, unless forced to be a socket."""
    typ = spec[0]
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if opts.get("forceInput") or opts.get("defaultInput"):
        return False
    return isinstance(typ, (list, tuple)) or typ in WIDGET_TYPES


def has_control(name: str, spec) -> bool:
    """The editor adds a "control after generate" value after this widget."""
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return bool(opts.get("control_after_generate")) or (spec[0] == "INT" and name in ("seed", "noise_seed"))


def has_upload(spec) -> bool:
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return any(opts.get(k) for k in UPLOAD_OPTIONS)


def _link_tuple(link) -> tuple:
    """(id, origin node, origin slot, target node, target slot, type), from the list or the dict link format."""
    if isinstance(link, dict):
        return (link["id"], link["origin_id"], link["origin_slot"], link["target_id"], link["target_slot"],
                link.get("type"))
    return tuple(link[:6])


def widget_inputs(node: dict, spec: dict) -> dict[str, Any]:
    """Map the node's stored widget values to input names, as the editor laid the widgets out."""
    stored = node.get("widgets_values")
    widgets = [(name, s) for section in ("required", "optional") for name, s in (spec.get(section) or {}).items()
               if is_widget(s)]
    if isinstance(stored, dict):  # some nodes store their widgets by name
        return {name: stored[name] for name, _ in widgets if name in stored}
    values = list(stored or [])
    base = sum(1 + has_control(name, s) for name, s in widgets)
    uploads = sum(1 for _, s in widgets if has_upload(s))
    skip_uploads = uploads > 0 and len(values) >= base + uploads
    out = {}
    for name, s in widgets:
        if not values:
            break
        out[name] = values.pop(0)
        if has_control(name, s) and values:
            values.pop(0)
        if skip_uploads and has_upload(s) and values:
            values.pop(0)
    return out


def convert(workflow: dict, spec_of: Callable[[str], Optional[dict]],
            display_names: Optional[dict] = None) -> dict:
    """The API prompt for `workflow`; spec_of(type) gives a node type's inputs ({"required": .., "optional": ..})
    or None when the type is not installed. `_meta.title` is the node's title, else its display name (as the
    editor writes it), else its type."""
    display_names = display_names or {}
    if "nodes" not in workflow or "links" not in workflow:
        raise WorkflowError("not a UI-format workflow (no \"nodes\"/\"links\"); an API-format prompt needs no "
                            "conversion")
    subgraphs = {s.get("id") for s in (workflow.get("definitions") or {}).get("subgraphs") or []}
    by_id = {n["id"]: n for n in workflow["nodes"]}
    links = {}
    for raw in workflow["links"] or []:
        link = _link_tuple(raw)
        links[link[0]] = link
    specs, missing, nested = {}, [], []
    for n in workflow["nodes"]:
        t = n["type"]
        if t in DROPPED_TYPES or t in ("Reroute", "PrimitiveNode") or n.get("mode") in (MODE_MUTED, MODE_BYPASSED):
            continue
        if t in subgraphs:
            nested.append(f"{n['id']} ({n.get('title') or 'subgraph'})")
            continue
        if t not in specs:
            specs[t] = spec_of(t)
        if specs[t] is None:
            missing.append(f"{t} (node {n['id']})")
    if nested:
        raise WorkflowError(f"the workflow has subgraph node(s) {', '.join(nested)}; unpack them in the editor "
                            "(right-click > Unpack Subgraph), save, and convert again")
    if missing:
        raise WorkflowError(f"node type(s) not installed: {', '.join(missing)}; install the pack(s) that provide "
                            "them (ComfyUI-Manager: Install Missing Custom Nodes) or remove those nodes")

    def source(link_id: int, seen: frozenset = frozenset()):
        """What feeds this link once frontend-only, muted and bypassed nodes are gone: ("link", id, slot),
        ("value", v), or None (nothing: the input is left unset)."""
        if link_id in seen:
            raise WorkflowError(f"link {link_id} loops through reroutes or bypassed nodes")
        seen = seen | {link_id}
        if link_id not in links:
            raise WorkflowError(f"link {link_id} is used by a node but missing from the workflow's links")
        _, src_id, src_slot, _, _, typ = links[link_id]
        src = by_id.get(src_id)
        if src is None:  # kept as a reference: ComfyUI's validation names the missing node
            return ("link", str(src_id), src_slot)
        ins = src.get("inputs") or []
        if src["type"] == "PrimitiveNode":
            vals = src.get("widgets_values") or []
            return ("value", vals[0]) if vals else None
        if src["type"] == "Reroute":
            up = ins[0].get("link") if ins else None
            return source(up, seen) if up is not None else None
        if src.get("mode") == MODE_MUTED:
            return None
        if src.get("mode") == MODE_BYPASSED:
            outs = src.get("outputs") or []
            out_type = outs[src_slot].get("type") if src_slot < len(outs) else typ
            same = [i for i, inp in enumerate(ins) if inp.get("link") is not None and
                    (inp.get("type") == out_type or "*" in (inp.get("type"), out_type))]
            if not same:
                return None
            pick = src_slot if src_slot in same else same[0]
            return source(ins[pick]["link"], seen)
        return ("link", str(src_id), src_slot)

    api = {}
    for n in workflow["nodes"]:
        t = n["type"]
        if t not in specs or n.get("mode") in (MODE_MUTED, MODE_BYPASSED):
            continue
        inputs = widget_inputs(n, specs[t])
        for inp in n.get("inputs") or []:
            if inp.get("link") is None:
                continue
            got = source(inp["link"])
            name = (inp.get("widget") or {}).get("name") or inp["name"]
            if got is None:  # fed by a muted node: a widget keeps its stored value, a socket stays unset
                continue
            if got[0] == "value":
                inputs[name] = got[1]
            else:
                inputs[name] = [got[1], got[2]]
        title = n.get("title") or display_names.get(t) or t
        api[str(n["id"])] = {"class_type": t, "inputs": inputs, "_meta": {"title": title}}
    return api


def to_api(workflow: dict, node_classes: dict, display_names: Optional[dict] = None) -> dict:
    """Convert with node classes (e.g. ComfyUI's nodes.NODE_CLASS_MAPPINGS after its custom nodes are loaded, and
    nodes.NODE_DISPLAY_NAME_MAPPINGS for the titles)."""

    def spec_of(t: str) -> Optional[dict]:
        cls = node_classes.get(t)
        return None if cls is None else cls.INPUT_TYPES()

    return convert(workflow, spec_of, display_names)


def to_api_from_object_info(workflow: dict, object_info: dict) -> dict:
    """Convert with a running server's GET /object_info answer."""

    def spec_of(t: str) -> Optional[dict]:
        info = object_info.get(t)
        return None if info is None else info.get("input") or {}

    names = {t: info["display_name"] for t, info in object_info.items() if info.get("display_name")}
    return convert(workflow, spec_of, names)


def check_link_types(workflow: dict, node_classes: dict) -> list[str]:
    """Every link's type must equal the source output type and the target input type."""
    by_id = {n["id"]: n for n in workflow["nodes"]}
    problems = []
    for lid, src, sslot, dst, dslot, typ in (_link_tuple(raw) for raw in workflow["links"]):
        s_cls = node_classes[by_id[src]["type"]]
        d_node = by_id[dst]
        d_cls = node_classes[d_node["type"]]
        out_type = s_cls.RETURN_TYPES[sslot]
        name = d_node["inputs"][dslot]["name"]
        spec = {**d_cls.INPUT_TYPES().get("required", {}), **d_cls.INPUT_TYPES().get("optional", {})}
        in_type = spec[name][0] if name in spec else None
        if not (out_type == typ == in_type):
            problems.append(f"link {lid}: {by_id[src]['type']}[{sslot}]={out_type} -> "
                            f"{d_node['type']}.{name}={in_type}")
    return problems
