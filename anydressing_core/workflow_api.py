"""Convert a ComfyUI UI-format workflow to API format using the node definitions (plain Python, no ComfyUI import).

Used by the batch command and the tests; the node classes are passed in (NODE_CLASS_MAPPINGS of a booted host)."""

from __future__ import annotations

LINK_TYPES_ARE_WIDGETS = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def _is_widget(spec) -> bool:
    typ = spec[0]
    return isinstance(typ, list) or typ in LINK_TYPES_ARE_WIDGETS


def _has_control(name: str, spec) -> bool:
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return bool(opts.get("control_after_generate")) or (spec[0] == "INT" and name in ("seed", "noise_seed"))


def to_api(workflow: dict, node_classes: dict) -> dict:
    links = {link[0]: link for link in workflow["links"]}
    api = {}
    for node in workflow["nodes"]:
        cls = node_classes[node["type"]]
        spec = cls.INPUT_TYPES()
        values = list(node.get("widgets_values") or [])
        inputs = {}
        linked = {i["name"]: i["link"] for i in node.get("inputs", []) if i.get("link") is not None}
        for section in ("required", "optional"):
            for name, s in spec.get(section, {}).items():
                if _is_widget(s):
                    if values:
                        inputs[name] = values.pop(0)
                        if _has_control(name, s) and values:
                            values.pop(0)
                if name in linked:
                    link = links[linked[name]]
                    inputs[name] = [str(link[1]), link[2]]
        api[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return api


def check_link_types(workflow: dict, node_classes: dict) -> list[str]:
    """Every link's type must equal the source output type and the target input type."""
    by_id = {n["id"]: n for n in workflow["nodes"]}
    problems = []
    for lid, src, sslot, dst, dslot, typ in workflow["links"]:
        s_cls = node_classes[by_id[src]["type"]]
        d_node = by_id[dst]
        d_cls = node_classes[d_node["type"]]
        out_type = s_cls.RETURN_TYPES[sslot]
        name = d_node["inputs"][dslot]["name"]
        spec = {**d_cls.INPUT_TYPES().get("required", {}), **d_cls.INPUT_TYPES().get("optional", {})}
        in_type = spec[name][0] if name in spec else None
        if not (out_type == typ == in_type):
            problems.append(f"link {lid}: {by_id[src]['type']}[{sslot}]={out_type} -> {d_node['type']}.{name}={in_type}")
    return problems
