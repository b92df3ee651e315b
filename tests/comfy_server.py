"""A real ComfyUI server process on loopback for the host tests, one per test process (a boot costs ~7 s)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import host as host_mod


class Server:
    """ComfyUI's main.py with this pack and the test fixtures, started in a fresh base directory.

    The tutorial is marked done so that the editor opens on the graph (the browser tests share this server).
    """

    def __init__(self, root: Path, settings: dict = None):
        self.base = host_mod.scratch_dir("anydressing-server-")
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
             "--disable-auto-launch", "--disable-api-nodes"],
            cwd=root, env=dict(os.environ), stdout=self.log, stderr=subprocess.STDOUT)
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
