"""Host: the batch command as a client of real ComfyUI servers on loopback (each with the pack): outfits split over
two servers, a server killed mid-run, another client's prompt left alone on Ctrl-C, no child left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import graphs
import host as host_mod
from comfy_server import Server

pytestmark = pytest.mark.host

TOOL = host_mod.REPO / "tools" / "batch_dress.py"


def workflow(steps: int = 2) -> dict:
    wf = graphs.dressing_prompt(garments=((1, "upper"),), latent_w=64, latent_h=64, steps=steps)
    wf.pop("capture")
    wf["decode"] = {"class_type": "VAEDecode", "inputs": {"samples": ["sampler", 0], "vae": ["vae", 0]}}
    wf["save"] = {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": "x"}}
    return wf


@pytest.fixture(scope="module")
def servers(host):
    started = [Server(host.root), Server(host.root)]
    yield started
    for s in started:
        if s.proc.poll() is None:
            s.stop()


@pytest.fixture
def work(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "g").mkdir()
    for name in ("tee", "shirt", "jeans", "skirt"):
        Image.fromarray((rng.random((80, 64, 3)) * 255).astype(np.uint8)).save(tmp_path / "g" / f"{name}.png")
    rows = [f"o{i},g/{('tee', 'shirt')[i % 2]}.png,g/{('jeans', 'skirt')[i // 2 % 2]}.png,,{i}" for i in range(8)]
    (tmp_path / "outfits.csv").write_text("id,upper,lower,prompt,seed\n" + "\n".join(rows) + "\n")
    return tmp_path


def batch_cmd(work: Path, urls: list[str], out: str, steps: int = 2) -> list[str]:
    (work / "wf.json").write_text(json.dumps(workflow(steps)))
    cmd = [sys.executable, str(TOOL), "--workflow", str(work / "wf.json"), "--outfits", str(work / "outfits.csv"),
           "--out", out, "--output-dir", str(work / "output")]
    for url in urls:
        cmd += ["--server", url]
    return cmd


def done_ids(work: Path, out: str) -> list[str]:
    manifest = work / "output" / out / "done.jsonl"
    return [json.loads(line)["id"] for line in manifest.read_text().splitlines()] if manifest.exists() else []


def test_a_csv_is_split_over_two_servers(servers, work):
    r = subprocess.run(batch_cmd(work, [s.url for s in servers], "split"), capture_output=True, text=True,
                       timeout=600, env=dict(os.environ))
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert sorted(done_ids(work, "split")) == [f"o{i}" for i in range(8)]
    per = r.stdout.splitlines()[-1]
    assert per.startswith("per server: ")
    counts = [int(part.rsplit(" ", 1)[1]) for part in per[len("per server: "):].split(", ")]
    assert len(counts) == 2 and sum(counts) == 8 and min(counts) >= 1, per
    images = sorted((work / "output" / "split").glob("*.png"))
    assert [p.name for p in images] == [f"o{i}_00001_.png" for i in range(8)]
    meta = json.loads(Image.open(images[3]).info["anydressing_outfit"])
    assert meta["id"] == "o3" and meta["seed"] == 3 and meta["garments"]["upper"].endswith("shirt.png")
    # the garments went up once per server, under names from their content
    for s in servers:
        uploaded = sorted(p.name for p in (s.base / "input" / "anydressing_batch").iterdir())
        assert len(uploaded) <= 4 and all(len(n) == len("0123456789abcdef.png") for n in uploaded)
        assert not (s.base / "output" / "x").exists()  # the servers keep no output of ours


def test_ctrl_c_withdraws_only_our_prompts(servers, work, store):
    """Another client's prompt queued on the same server runs to its end; ours are interrupted or withdrawn."""
    server = servers[0]
    other = graphs.dressing_prompt(patched=False, steps=30, capture_key="other")
    other_id = server.post("/prompt", {"prompt": other, "client_id": "someone-else"})["prompt_id"]
    proc = subprocess.Popen(batch_cmd(work, [server.url], "ctrlc", steps=30), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ))
    deadline = time.time() + 120
    while not any(item[3].get("client_id", "").startswith("anydressing-")
                  for item in server.get("/queue")["queue_pending"] + server.get("/queue")["queue_running"]):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, out + err[-3000:]
    assert [line for line in err.splitlines() if line.startswith("interrupted")] == [
        "interrupted: 0 of 8 outfits done; run the same command to continue"]
    assert server.wait(other_id, timeout=300)["status"]["status_str"] == "success"
    queue = server.get("/queue")
    assert queue["queue_pending"] == [] and queue["queue_running"] == []
    assert done_ids(work, "ctrlc") == []


def test_a_server_killed_mid_run_loses_no_outfit_and_repeats_none(servers, work):
    """(Runs last of the module's server tests: it kills the second server.)"""
    pair = servers
    proc = subprocess.Popen(batch_cmd(work, [s.url for s in pair], "killed", steps=6), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ))
    deadline = time.time() + 300
    while len(done_ids(work, "killed")) < 1:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.02)
    pair[1].proc.kill()
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, out + err[-3000:]
    assert f"{pair[1].url.split('://')[1]} stopped answering" in err
    ids = done_ids(work, "killed")
    assert sorted(ids) == [f"o{i}" for i in range(8)] and len(ids) == len(set(ids))  # each exactly once
    assert len(list((work / "output" / "killed").glob("*.png"))) == 8


def _children_of_base(base: Path) -> list:
    import psutil

    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info.get("cmdline") or []
        if "main.py" in cmd and str(base) in cmd:
            found.append(p)
    return found


@pytest.mark.parametrize("ending", ["done", "failure", "ctrl-c"])
def test_the_local_default_leaves_no_comfyui_behind(host, work, ending):
    """Without --server the command starts one ComfyUI and stops it on every way out."""
    base = host_mod.scratch_dir("anydressing-local-")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / host_mod.PACK_LINK_NAME).symlink_to(host_mod.REPO, target_is_directory=True)
    (base / "custom_nodes" / "anydressing_test_fixtures").symlink_to(host_mod.FIXTURE_PACK, target_is_directory=True)
    host_mod.add_shims_if_needed()
    wf = workflow(steps=30 if ending == "ctrl-c" else 1)
    if ending == "failure":
        wf["sampler"]["inputs"]["sampler_name"] = "no_such_sampler"
    (work / "wf.json").write_text(json.dumps(wf))
    rows = 40 if ending == "ctrl-c" else 1  # (a Ctrl-C lands mid-run, whatever the machine's speed)
    (work / "outfits.csv").write_text("id,upper,seed\n" + "".join(f"o{i},g/tee.png,{i}\n" for i in range(rows)))
    cmd = [sys.executable, str(TOOL), "--comfyui", str(host.root), "--workflow", str(work / "wf.json"), "--outfits",
           str(work / "outfits.csv"), "--out", "local", "--", "--cpu", "--use-pytorch-cross-attention",
           "--base-directory", str(base), "--database-url", "sqlite:///:memory:"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ))
    if ending == "ctrl-c":
        deadline = time.time() + 120
        while not _children_of_base(base):
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.05)
        time.sleep(4)  # the child is up, most likely dressing (a Ctrl-C while it starts must leave nothing either)
        proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == {"done": 0, "failure": 1, "ctrl-c": 130}[ending], out + err[-3000:]
    if ending == "failure":
        assert "node sampler (KSampler), input sampler_name: 'no_such_sampler' is not one of:" in err
    assert _children_of_base(base) == []
