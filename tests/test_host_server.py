"""Host: the real ComfyUI server (loopback only): 50 prompts in a row, a queue of two graphs, an interrupt."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import torch

import graphs
import host as host_mod

pytestmark = pytest.mark.host


class Server:
    def __init__(self, root: Path, settings: dict = None):
        self.base = Path(tempfile.mkdtemp(prefix="anydressing-server-"))
        if settings:
            (self.base / "user" / "default").mkdir(parents=True)
            (self.base / "user" / "default" / "comfy.settings.json").write_text(json.dumps(settings))
        (self.base / "custom_nodes").mkdir()
        (self.base / "custom_nodes" / host_mod.PACK_LINK_NAME).symlink_to(host_mod.REPO, target_is_directory=True)
        (self.base / "custom_nodes" / "anydressing_test_fixtures").symlink_to(host_mod.FIXTURE_PACK,
                                                                               target_is_directory=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        host_mod.add_shims_if_needed()
        self.log = open(self.base / "server.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, "main.py", "--cpu", "--use-pytorch-cross-attention", "--listen", "127.0.0.1", "--port",
             str(self.port), "--base-directory", str(self.base), "--database-url", "sqlite:///:memory:",
             "--disable-auto-launch"], cwd=root, env=dict(os.environ), stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                self.get("/system_stats")
                return
            except OSError:
                if self.proc.poll() is not None:
                    break
                time.sleep(0.5)
        raise RuntimeError("ComfyUI server did not start: " + (self.base / "server.log").read_text()[-3000:])

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read() or b"null")

    def post(self, path: str, body: dict):
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read() or b"null")

    def submit(self, prompt: dict) -> str:
        return self.post("/prompt", {"prompt": prompt, "client_id": "anydressing-tests"})["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 120) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            h = self.get(f"/history/{prompt_id}")
            if h and prompt_id in h and h[prompt_id].get("status", {}).get("completed") is not None:
                return h[prompt_id]
            time.sleep(0.05)
        raise TimeoutError(prompt_id)

    def rss(self) -> int:
        import psutil

        return psutil.Process(self.proc.pid).memory_info().rss

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


@pytest.fixture(scope="module")
def server(host):
    s = Server(host.root)
    yield s
    s.stop()


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
