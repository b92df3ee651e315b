"""UI workflow -> API prompt: each editor feature is checked against the same graph written without it (a reroute
against a direct link, a bypassed node against the graph rewired around it, ...), so the expectation is computed
by the converter on a plainer graph, plus the exact values the editor stores positionally."""

from __future__ import annotations

import copy

import pytest

from anydressing_core.workflow_api import WorkflowError, convert, to_api, to_api_from_object_info

SPECS = {
    "Loader": {"required": {"ckpt_name": (["a.ckpt", "b.ckpt"], {})}},
    "Patch": {"required": {"model": ("MODEL",), "strength": ("FLOAT", {"default": 1.0})},
              "optional": {"clip": ("CLIP",)}},
    "Latent": {"required": {"width": ("INT", {"default": 512}), "height": ("INT", {"default": 512})}},
    "Sampler": {"required": {"model": ("MODEL",), "seed": ("INT", {"control_after_generate": True}),
                             "steps": ("INT", {}), "sampler_name": (["euler", "ddim"], {}), "latent": ("LATENT",)},
                "optional": {"denoise": ("FLOAT", {}), "count": ("INT", {"forceInput": True})},
                "hidden": {"prompt": "PROMPT"}},
    "LoadPic": {"required": {"image": (["x.png", "y.png"], {"image_upload": True}), "channel": (["rgb", "alpha"],)}},
    "Number": {"required": {"value": ("INT", {})}},
}
OUTPUTS = {"Loader": ["MODEL", "CLIP"], "Patch": ["MODEL"], "Latent": ["LATENT"], "Sampler": ["LATENT"],
           "LoadPic": ["IMAGE"], "Number": ["INT"]}


class Graph:
    """A UI-format workflow built like the editor saves it."""

    def __init__(self):
        self.nodes, self.links = [], []

    def node(self, type_, widgets=(), inputs=(), outputs=None, mode=0, nid=None) -> int:
        nid = nid or len(self.nodes) + 1
        outs = outputs if outputs is not None else OUTPUTS.get(type_, [])
        stored = dict(widgets) if isinstance(widgets, dict) else list(widgets)
        self.nodes.append({"id": nid, "type": type_, "mode": mode, "widgets_values": stored,
                           "inputs": [dict(name=n, type=t, link=None, **({"widget": {"name": n}} if w else {}))
                                      for n, t, w in ((i + (False,))[:3] for i in inputs)],
                           "outputs": [{"name": t, "type": t, "links": []} for t in outs]})
        return nid

    def link(self, src, slot, dst, name) -> None:
        lid = len(self.links) + 1
        s = next(n for n in self.nodes if n["id"] == src)
        d = next(n for n in self.nodes if n["id"] == dst)
        k = [i["name"] for i in d["inputs"]].index(name)
        d["inputs"][k]["link"] = lid
        s["outputs"][slot]["links"].append(lid)
        self.links.append([lid, src, slot, dst, k, s["outputs"][slot]["type"]])

    def wf(self) -> dict:
        return {"nodes": copy.deepcopy(self.nodes), "links": copy.deepcopy(self.links)}


def api(wf: dict) -> dict:
    out = convert(wf, SPECS.get)
    for node in out.values():
        node.pop("_meta")
    return out


def base(patch_mode=0, via=None) -> Graph:
    """Loader -> Patch -> Sampler <- Latent. via: put a Reroute or a bypassed Patch between Loader and Sampler."""
    g = Graph()
    g.node("Loader", ["b.ckpt"])
    g.node("Patch", [0.5], [("model", "MODEL"), ("clip", "CLIP")], mode=patch_mode)
    g.node("Latent", [64, 96])
    g.node("Sampler", [7, "randomize", 3, "ddim", 0.8],
           [("model", "MODEL"), ("latent", "LATENT"), ("count", "INT")])
    g.link(1, 0, 2, "model")
    g.link(1, 1, 2, "clip")
    g.link(2, 0, 4, "model")
    g.link(3, 0, 4, "latent")
    return g


def test_widgets_are_mapped_in_input_order_skipping_the_seed_control_value():
    out = api(base().wf())
    assert out == {
        "1": {"class_type": "Loader", "inputs": {"ckpt_name": "b.ckpt"}},
        "2": {"class_type": "Patch", "inputs": {"strength": 0.5, "model": ["1", 0], "clip": ["1", 1]}},
        "3": {"class_type": "Latent", "inputs": {"width": 64, "height": 96}},
        "4": {"class_type": "Sampler", "inputs": {"seed": 7, "steps": 3, "sampler_name": "ddim", "denoise": 0.8,
                                                  "model": ["2", 0], "latent": ["3", 0]}},
    }


def test_object_info_json_and_node_classes_give_the_same_prompt():
    """The same specs reached two ways: as node classes' INPUT_TYPES and as /object_info JSON (lists, not tuples)."""
    import json

    classes = {t: type(t, (), {"INPUT_TYPES": classmethod(lambda cls, s=s: s)}) for t, s in SPECS.items()}
    info = json.loads(json.dumps({t: {"input": s, "output": OUTPUTS[t]} for t, s in SPECS.items()}))
    wf = base().wf()
    assert to_api(wf, classes) == to_api_from_object_info(wf, info) == convert(wf, SPECS.get)


def test_bypassed_node_equals_the_graph_rewired_around_it():
    bypassed = api(base(patch_mode=4).wf())
    g = base()
    g.nodes = [n for n in g.nodes if n["id"] != 2]
    g.links = [lk for lk in g.links if 2 not in (lk[1], lk[3])]
    g.link(1, 0, 4, "model")  # MODEL in -> MODEL out: the same type as the bypassed node's output
    assert bypassed == api(g.wf())
    assert bypassed["4"]["inputs"]["model"] == ["1", 0]


def test_muted_node_is_dropped_with_its_links():
    muted = api(base(patch_mode=2).wf())
    assert "2" not in muted and "model" not in muted["4"]["inputs"]  # ComfyUI's validation reports it missing
    g = base()
    g.nodes = [n for n in g.nodes if n["id"] != 2]
    g.links = [lk for lk in g.links if 2 not in (lk[1], lk[3])]
    for n in g.nodes:
        for i in n["inputs"]:
            if i["link"] is not None and i["link"] not in {lk[0] for lk in g.links}:
                i["link"] = None
    assert muted == api(g.wf())


def test_chained_reroutes_equal_a_direct_link():
    g = base()
    latent_link = g.links[3]
    r1 = g.node("Reroute", [], [("", "*")], outputs=["LATENT"], nid=10)
    r2 = g.node("Reroute", [], [("", "*")], outputs=["LATENT"], nid=11)
    sampler = g.nodes[3]
    sampler["inputs"][1]["link"] = None
    g.links.remove(latent_link)
    g.link(3, 0, r1, "")
    g.link(r1, 0, r2, "")
    g.link(r2, 0, 4, "latent")
    assert api(g.wf()) == api(base().wf())


def test_primitive_node_value_reaches_the_converted_widget():
    g = base()
    sampler = g.nodes[3]
    sampler["inputs"].append({"name": "steps", "type": "INT", "link": None, "widget": {"name": "steps"}})
    sampler["widgets_values"][2] = 99  # stale copy in the target; the primitive's value wins
    p = g.node("PrimitiveNode", [12, "fixed"], [], outputs=["INT"], nid=20)
    g.link(p, 0, 4, "steps")
    out = api(g.wf())
    assert "20" not in out and out["4"]["inputs"]["steps"] == 12
    expected = api(base().wf())
    expected["4"]["inputs"]["steps"] = 12
    assert out == expected


def test_converted_widget_linked_to_a_real_node_takes_the_link_and_force_input_is_a_socket():
    g = base()
    sampler = g.nodes[3]
    sampler["inputs"].append({"name": "seed", "type": "INT", "link": None, "widget": {"name": "seed"}})
    num = g.node("Number", [5], nid=30)
    g.link(num, 0, 4, "seed")
    g.link(num, 0, 4, "count")
    out = api(g.wf())
    assert out["4"]["inputs"]["seed"] == ["30", 0] and out["4"]["inputs"]["count"] == ["30", 0]
    assert out["4"]["inputs"]["steps"] == 3  # positions after the seed are unchanged by the link
    assert out["30"] == {"class_type": "Number", "inputs": {"value": 5}}


def test_upload_button_value_and_dict_widgets_values():
    g = Graph()
    g.node("LoadPic", ["y.png", "image", "alpha"])  # the editor saved the upload button's value after the combo
    g.node("LoadPic", ["y.png", "alpha"], nid=2)  # a frontend that does not save it
    g.node("Latent", {"height": 8, "width": 16}, nid=3)
    g.node("Note", ["just text"], nid=4, outputs=[])
    g.node("MarkdownNote", ["# text"], nid=5, outputs=[])
    out = api(g.wf())
    assert out == {"1": {"class_type": "LoadPic", "inputs": {"image": "y.png", "channel": "alpha"}},
                   "2": {"class_type": "LoadPic", "inputs": {"image": "y.png", "channel": "alpha"}},
                   "3": {"class_type": "Latent", "inputs": {"width": 16, "height": 8}}}


def test_titles_go_to_meta():
    g = base()
    g.nodes[3]["title"] = "Main sampler"
    out = convert(g.wf(), SPECS.get)
    assert out["4"]["_meta"] == {"title": "Main sampler"} and out["1"]["_meta"] == {"title": "Loader"}


def test_unknown_types_subgraphs_and_api_format_are_clear_errors():
    g = base()
    g.node("FancyUpscaler", [2], nid=40)
    g.node("FancyUpscaler", [2], nid=41, mode=4)  # bypassed: not needed, not reported
    with pytest.raises(WorkflowError) as e:
        api(g.wf())
    assert str(e.value) == ("node type(s) not installed: FancyUpscaler (node 40); install the pack(s) that provide "
                            "them (ComfyUI-Manager: Install Missing Custom Nodes) or remove those nodes")
    g = base()
    g.node("0b5f9c3e-1111-4222-8333-944455556666", [], nid=50)
    wf = g.wf()
    wf["definitions"] = {"subgraphs": [{"id": "0b5f9c3e-1111-4222-8333-944455556666"}]}
    with pytest.raises(WorkflowError) as e:
        api(wf)
    assert str(e.value) == ("the workflow has subgraph node(s) 50 (subgraph); unpack them in the editor "
                            "(right-click > Unpack Subgraph), save, and convert again")
    with pytest.raises(WorkflowError) as e:
        api({"1": {"class_type": "Loader", "inputs": {}}})
    assert "not a UI-format workflow" in str(e.value)


def test_dict_link_format_equals_list_format():
    wf = base().wf()
    wf["links"] = [dict(zip(("id", "origin_id", "origin_slot", "target_id", "target_slot", "type"), lk))
                   for lk in wf["links"]]
    assert api(wf) == api(base().wf())
