"""Host + browser: the real ComfyUI server and frontend in headless chromium load every workflow, show the
AnyDressing tooltips, and run a tiny workflow queued from the page. Screenshots: ANYDRESSING_SCREENSHOTS=DIR."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

import graphs
import host as host_mod
from test_host_workflows import EXTERNAL

pytestmark = pytest.mark.host

BROWSER_DIR = Path(__file__).resolve().parent / "browser"
CHROMIUM = "/usr/bin/chromium"
WORKFLOWS = sorted((host_mod.REPO / "workflows").glob("*.json"))
# saved by v0.8.0's editor with the pack before its nodes moved to the V3 schema (tests/browser/save_workflow.mjs)
SAVED_BEFORE_V3 = Path(__file__).resolve().parent / "browser" / "workflow_saved_before_v3.json"


def browser_missing() -> str:
    if not Path(CHROMIUM).exists():
        return "Debian's chromium is not installed (bash tests/setup_browser.sh installs it)"
    if shutil.which("node") is None:
        return "node is not installed"
    if not (BROWSER_DIR / "node_modules" / "playwright-core").is_dir():
        return "playwright-core is not installed (bash tests/setup_browser.sh installs it)"
    return ""


@pytest.fixture(scope="module")
def editor(host, request):
    why = browser_missing()
    if why and os.environ.get("CI") == "true":  # the only check that the editor loads the workflows: never skipped
        pytest.fail(f"CI must run the browser tests: {why}")
    if why:
        pytest.skip(f"browser tests skipped: {why}")
    server = request.getfixturevalue("comfy_server")  # started only when a browser is there
    for wf in WORKFLOWS:  # the named model files exist (empty), as on a user's machine: no missing-models dialog
        for m in json.loads(wf.read_text()).get("models", []):
            (server.base / "models" / m["directory"]).mkdir(parents=True, exist_ok=True)
            (server.base / "models" / m["directory"] / m["name"]).touch()
    shots = Path(os.environ.get("ANYDRESSING_SCREENSHOTS") or host_mod.scratch_dir("anydressing-shots-"))
    shots.mkdir(parents=True, exist_ok=True)
    tiny = graphs.dressing_prompt(capture_key="browser")
    tiny.pop("capture")
    tiny["save"] = {"class_type": "SaveLatent", "inputs": {"samples": ["sampler", 0], "filename_prefix": "browser/q"}}
    queue_file = shots / "tiny_api.json"
    queue_file.write_text(json.dumps(tiny))
    before = set(server.get("/history") or {})
    r = subprocess.run(["node", str(BROWSER_DIR / "editor_check.mjs"), server.url, str(shots), str(queue_file)]
                       + [str(p) for p in WORKFLOWS + [SAVED_BEFORE_V3]], capture_output=True, text=True, timeout=600, cwd=BROWSER_DIR)
    queue_file.unlink()
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    deadline = time.time() + 120
    new = {}
    while time.time() < deadline:
        new = {k: v for k, v in (server.get("/history") or {}).items() if k not in before}
        if new and all(v.get("status", {}).get("completed") is not None for v in new.values()):
            break
        time.sleep(0.2)
    return result, new, shots, server


def test_every_workflow_loads_with_no_unknown_missing_node_and_no_error(editor):
    result, _, shots, _ = editor
    assert [w["name"] for w in result["workflows"]] == [p.name for p in WORKFLOWS + [SAVED_BEFORE_V3]]
    for w in result["workflows"][:len(WORKFLOWS)]:
        wf = json.loads((host_mod.REPO / "workflows" / w["name"]).read_text())
        assert w["nodes"] == len(wf["nodes"]), w
        assert set(w["missing"] or []) <= set(EXTERNAL), w  # only other packs' nodes may be missing
        assert set(w["errors"]) <= set(w["missing"] or []), w  # the missing nodes are the only ones flagged
        assert (shots / w["name"].replace(".json", ".png")).stat().st_size > 10_000
        assert w["pageErrors"] == [], w  # loading our workflows raises nothing in the page
        for node in wf["nodes"]:  # every saved widget value of our nodes is where it was saved
            if node["type"].startswith("AnyDressing"):
                assert w["widgets"][str(node["id"])] == node.get("widgets_values", []), (w["name"], node["type"])
    # The 0.3.64 frontend raises one TypeError of its own at start-up (a settings onChange), with or without this
    # pack installed (checked on a bare server); nothing at start-up may come from us.
    assert not [e for e in result["startupErrors"] if "anydressing" in e.lower()]
    assert result["queueErrors"] == []


def test_anydressing_nodes_show_their_tooltips_in_the_editor(editor, host):
    result, *_ = editor
    ours = {k: v for k, v in host.nodes.NODE_CLASS_MAPPINGS.items() if k.startswith("AnyDressing")}
    assert set(result["tooltips"]) == set(ours)
    for node_id, info in result["tooltips"].items():
        assert info["display"] == host.nodes.NODE_DISPLAY_NAME_MAPPINGS[node_id]
        assert info["description"] and all(info["inputs"].values()), (node_id, info)
        assert len(info["outputs"]) == len(ours[node_id].RETURN_TYPES) and all(info["outputs"])


def test_a_workflow_queued_from_the_page_runs(editor):
    result, new, _, server = editor
    assert result["queued"] and len(new) == 1
    (entry,) = new.values()
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert list((server.base / "output" / "browser").glob("q_*.latent"))


def test_a_workflow_saved_before_the_v3_nodes_loads_unchanged_and_runs(editor, host):
    """A graph of all six nodes with non-default values, saved by the editor when the nodes were V1: it loads with no
    missing node and every widget value where it was saved, the editor turns it into the same prompt as the pack's
    converter, and that prompt runs (the dressed sample, its preview and the attention-map overlays)."""
    from anydressing_core.workflow_api import to_api

    result, _, _, server = editor
    (w,) = [w for w in result["workflows"] if w["name"] == SAVED_BEFORE_V3.name]
    saved = json.loads(SAVED_BEFORE_V3.read_text())
    ours = {n["type"] for n in saved["nodes"] if n["type"].startswith("AnyDressing")}
    assert ours == {k for k in host.nodes.NODE_CLASS_MAPPINGS if k.startswith("AnyDressing")}
    assert not w["missing"] and w["errors"] == [] and w["pageErrors"] == [], w
    for node in saved["nodes"]:
        if node["type"].startswith("AnyDressing"):
            assert w["widgets"][str(node["id"])] == node["widgets_values"], node["type"]
    prompt = w["prompt"]
    assert to_api(saved, host.nodes.NODE_CLASS_MAPPINGS, host.nodes.NODE_DISPLAY_NAME_MAPPINGS) == prompt
    apply = next(v for v in prompt.values() if v["class_type"] == "AnyDressingApplyDressingAttention")["inputs"]
    assert (apply["strength"], apply["garment_weights"], apply["start_percent"]) == (0.55, "1.0, 0.8", 0.1)
    entry = server.wait(server.submit(prompt), timeout=300)
    assert entry["status"]["status_str"] == "success", entry["status"]
    previews = [k for k, v in prompt.items() if v["class_type"] == "PreviewImage"]
    assert len(previews) == 2 and all(entry["outputs"][k]["images"] for k in previews), entry["outputs"]


def test_workflow_converter_gives_the_editors_own_prompt(editor, host):
    """anydressing_core.workflow_api (used by the batch and workflow_to_api commands) against the editor's
    graphToPrompt: every shipped workflow whose nodes are all installed, and a graph built in the editor with a
    Reroute, a PrimitiveNode, a bypassed and a muted node and a Note."""
    from anydressing_core.workflow_api import to_api

    result, *_ = editor
    classes, names = host.nodes.NODE_CLASS_MAPPINGS, host.nodes.NODE_DISPLAY_NAME_MAPPINGS
    compared = []
    for w in result["workflows"][:len(WORKFLOWS)]:
        if w["missing"]:
            continue
        wf = json.loads((host_mod.REPO / "workflows" / w["name"]).read_text())
        assert to_api(wf, classes, names) == w["prompt"], w["name"]  # titles (_meta) included
        compared.append(w["name"])
    assert len(compared) >= 6, compared
    feats = result["editorFeatures"]
    assert isinstance(feats["prompt"], dict), feats["prompt"]
    ours = to_api(feats["workflow"], classes, names)
    assert ours == feats["prompt"]
    ks = next(v for v in ours.values() if v["class_type"] == "KSampler")
    assert ks["_meta"]["title"] == "Main sampler" == next(
        v for v in feats["prompt"].values() if v["class_type"] == "KSampler")["_meta"]["title"]
    # what the graph exercised, so that the equality above covers it
    types = {n["type"]: n.get("mode", 0) for n in feats["workflow"]["nodes"]}
    assert types["LoraLoader"] == 4 and types["Reroute"] == 0 and "PrimitiveNode" in types and "Note" in types
    assert sorted(v["class_type"] for v in ours.values()).count("CLIPTextEncode") == 2  # the muted one is gone
    assert ks["inputs"]["steps"] == 17 and ks["inputs"]["cfg"] == 3.5  # the primitive's value, the edited widget
    assert "negative" not in ks["inputs"]  # fed by the muted node
    ckpt_id = next(k for k, v in ours.items() if v["class_type"] == "CheckpointLoaderSimple")
    assert ks["inputs"]["model"] == [ckpt_id, 0]  # through the bypassed LoRA
