"""Host: the real ComfyUI server (loopback only): 50 prompts in a row, a queue of two graphs, an interrupt."""

from __future__ import annotations

import time

import pytest
import torch

import graphs
from comfy_server import Server

pytestmark = pytest.mark.host


@pytest.fixture
def server(comfy_server):
    return comfy_server


def prompt(key: str, **kw) -> dict:
    p = graphs.dressing_prompt(capture_key=key, **kw)
    p.pop("capture")
    p["save"] = {"class_type": "SaveLatent", "inputs": {"samples": ["sampler", 0], "filename_prefix": f"ad/{key}"}}
    return p


def result(server: Server, key: str) -> torch.Tensor:
    from safetensors.torch import load_file

    files = sorted((server.base / "output" / "ad").glob(f"{key}_*.latent"))
    assert len(files) == 1, files
    return load_file(str(files[0]))["latent_tensor"]


VARIANTS = [
    dict(garments=((1, "upper"), (2, "lower")), strength=0.7),
    dict(garments=((3, "dress"),), strength=0.5, masks=[(0.1, 0.0, 0.9, 1.0, 1.0)]),
    dict(garments=((1, "upper"), (2, "lower")), strength=1.0, weights="1, 0.5", include_uncond=True,
         masks=[(0, 0, 1, 0.6, 1.0), (0, 0.4, 1, 1, 0.7)]),
]


def test_fifty_prompts_same_results_and_no_memory_growth(server):
    results: dict[int, list[torch.Tensor]] = {0: [], 1: [], 2: []}
    rss = []
    for i in range(50):
        v = i % 3
        status = server.wait(server.submit(prompt(f"r{i}", **VARIANTS[v])))
        assert status["status"]["status_str"] == "success", status["status"]
        results[v].append(result(server, f"r{i}"))
        rss.append(server.rss())
    for v, outs in results.items():
        assert all(torch.equal(o, outs[0]) for o in outs), v  # identical prompts, bit-identical results
    assert not torch.equal(results[0][0], results[1][0])
    growth = rss[-1] - rss[2]
    print(f"server RSS after the first 3 prompts {rss[2] / 2**20:.1f} MiB, after 50 {rss[-1] / 2**20:.1f} MiB "
          f"(growth {growth / 2**20:+.1f} MiB)")
    assert growth < 64 * 2**20


def test_two_graphs_queued_together_stay_isolated(server):
    ids = [server.submit(prompt("qa", **VARIANTS[0])), server.submit(prompt("qb", **VARIANTS[1]))]
    for pid in ids:
        assert server.wait(pid)["status"]["status_str"] == "success"
    alone_a = server.wait(server.submit(prompt("sa", **VARIANTS[0])))
    alone_b = server.wait(server.submit(prompt("sb", **VARIANTS[1])))
    assert alone_a["status"]["status_str"] == alone_b["status"]["status_str"] == "success"
    assert torch.equal(result(server, "qa"), result(server, "sa"))
    assert torch.equal(result(server, "qb"), result(server, "sb"))


def test_interrupt_through_the_server_then_same_result(server):
    server.wait(server.submit(prompt("before", **VARIANTS[2])))
    slow = prompt("slow", steps=30, pre_model={"slow": {"class_type": "ADTestInterruptAt",
                                                        "inputs": {"model": ["model", 0], "call": 0, "sleep": 0.2}}},
                  **VARIANTS[2])
    pid = server.submit(slow)
    time.sleep(3.0)
    server.post("/interrupt", {})
    status = server.wait(pid)
    messages = [m[0] for m in status["status"].get("messages", [])]
    assert "execution_interrupted" in messages, messages
    assert not list((server.base / "output" / "ad").glob("slow_*.latent"))
    server.wait(server.submit(prompt("after", **VARIANTS[2])))
    assert torch.equal(result(server, "after"), result(server, "before"))


def test_workflow_to_api_command_with_a_running_servers_object_info(server, host, tmp_path):
    """tools/workflow_to_api.py --server: node definitions over HTTP from the server process give the same prompt
    as this process's node classes; a workflow needing a pack the server lacks is a one-line error naming it."""
    import json
    import os
    import subprocess
    import sys

    import host as host_mod
    from anydressing_core.workflow_api import to_api

    tool = host_mod.REPO / "tools" / "workflow_to_api.py"
    wf_path = host_mod.REPO / "workflows" / "anydressing_upper_lower.json"
    out = tmp_path / "api.json"
    r = subprocess.run([sys.executable, str(tool), str(wf_path), "-o", str(out), "--server", server.url],
                       capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert (r.returncode, r.stdout, r.stderr) == (0, "", f"wrote {out}: 13 nodes\n")
    assert json.loads(out.read_text()) == to_api(json.loads(wf_path.read_text()), host.nodes.NODE_CLASS_MAPPINGS,
                                                         host.nodes.NODE_DISPLAY_NAME_MAPPINGS)
    pose = host_mod.REPO / "workflows" / "anydressing_pose_three_garments.json"
    dw = next(n["id"] for n in json.loads(pose.read_text())["nodes"] if n["type"] == "DWPreprocessor")
    r = subprocess.run([sys.executable, str(tool), str(pose), "--server", server.url],
                       capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert (r.returncode, r.stdout, r.stderr) == (
        1, "", f"{pose}: node type(s) not installed: DWPreprocessor (node {dw}); install the pack(s) that provide "
               "them (ComfyUI-Manager: Install Missing Custom Nodes) or remove those nodes\n")
