"""Host: the batch dressing command, headless through ComfyUI's executor: CSV and folder outfits, resume, reuse."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import graphs
import host as host_mod

pytestmark = pytest.mark.host

TOOL = host_mod.REPO / "tools" / "batch_dress.py"


@pytest.fixture(scope="module")
def setup(host):
    base = Path(tempfile.mkdtemp(prefix="anydressing-batch-"))
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / host_mod.PACK_LINK_NAME).symlink_to(host_mod.REPO, target_is_directory=True)
    (base / "custom_nodes" / "anydressing_test_fixtures").symlink_to(host_mod.FIXTURE_PACK, target_is_directory=True)
    work = base / "work"
    (work / "garments" / "upper").mkdir(parents=True)
    (work / "garments" / "lower").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for rel in ("garments/upper/tee.png", "garments/upper/shirt.png", "garments/lower/jeans.png"):
        Image.fromarray((rng.random((80, 64, 3)) * 255).astype(np.uint8)).save(work / rel)
    wf = graphs.dressing_prompt(garments=((1, "upper"),), latent_w=64, latent_h=64)
    wf.pop("capture")
    wf["decode"] = {"class_type": "VAEDecode", "inputs": {"samples": ["sampler", 0], "vae": ["vae", 0]}}
    wf["save"] = {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": "x"}}
    (work / "workflow.json").write_text(json.dumps(wf))
    (work / "outfits.csv").write_text("id,upper,lower,prompt,seed\n"
                                      "a,garments/upper/tee.png,garments/lower/jeans.png,,0\n"
                                      "b,garments/upper/tee.png,garments/lower/jeans.png,,1\n"
                                      "c,garments/upper/shirt.png,,,0\n")
    return base, work


def batch(host, base, *args):
    host_mod.add_shims_if_needed()
    cmd = [sys.executable, str(TOOL), "--comfyui", str(host.root), *args, "--", "--cpu",
           "--use-pytorch-cross-attention", "--base-directory", str(base), "--database-url", "sqlite:///:memory:"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ), timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r.stdout + r.stderr


def test_csv_outfits_resume_and_reuse(host, setup):
    base, work = setup
    out = batch(host, base, "--workflow", str(work / "workflow.json"), "--outfits", str(work / "outfits.csv"),
                "--out", "b1", "--limit", "2")
    assert "3 outfits: 0 done, 3 to do" in out
    assert "done: 2 outfits, Encode Garments ran 1 time(s)" in out  # a and b share their garments
    assert "dressing" in out and "outfit" in out  # the progress bar
    images = sorted((base / "output" / "b1").glob("*.png"))
    assert [p.name.split("_")[0] for p in images] == ["a", "b"]
    meta = json.loads(Image.open(images[0]).info["anydressing_outfit"])
    assert meta["id"] == "a" and sorted(meta["garments"]) == ["lower", "upper"] and meta["seed"] == 0
    assert meta["garments"]["upper"].endswith("tee.png")
    # interrupted after two: the re-run does only the third
    out = batch(host, base, "--workflow", str(work / "workflow.json"), "--outfits", str(work / "outfits.csv"),
                "--out", "b1")
    assert "3 outfits: 2 done, 1 to do" in out and "done: 1 outfits" in out
    assert len(list((base / "output" / "b1").glob("*.png"))) == 3
    done = [json.loads(line)["id"] for line in (base / "output" / "b1" / "done.jsonl").read_text().splitlines()]
    assert done == ["a", "b", "c"]


def test_garment_folder_combinations(host, setup):
    base, work = setup
    out = batch(host, base, "--workflow", str(work / "workflow.json"), "--garments", str(work / "garments"),
                "--seeds", "0,7", "--out", "b2")
    assert "4 outfits: 0 done, 4 to do" in out  # 2 uppers x 1 lower x 2 seeds
    assert "Encode Garments ran 2 time(s)" in out  # one per garment set, shared by both seeds
    names = sorted(p.name.rsplit("_", 2)[0] for p in (base / "output" / "b2").glob("*.png"))
    assert names == ["shirt_jeans_s0", "shirt_jeans_s7", "tee_jeans_s0", "tee_jeans_s7"]


def test_ctrl_c_interrupts_the_running_prompt_and_records_nothing(host, setup):
    import signal
    import time

    base, work = setup
    wf = json.loads((work / "workflow.json").read_text())
    wf["sampler"]["inputs"]["steps"] = 100  # ~0.1 s a step here: the second outfit is mid-sampling at the Ctrl-C
    (work / "slow.json").write_text(json.dumps(wf))
    host_mod.add_shims_if_needed()
    cmd = [sys.executable, str(TOOL), "--comfyui", str(host.root), "--workflow", str(work / "slow.json"),
           "--outfits", str(work / "outfits.csv"), "--out", "b3", "--", "--cpu", "--use-pytorch-cross-attention",
           "--base-directory", str(base), "--database-url", "sqlite:///:memory:"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ))
    manifest = base / "output" / "b3" / "done.jsonl"
    deadline = time.time() + 300
    while not (manifest.exists() and manifest.read_text().count("\n") >= 1) and time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    t0 = time.time()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    stopped_in = time.time() - t0
    assert proc.returncode == 130, out + err
    lines = [line for line in (out + err).splitlines() if line.startswith("interrupted")]
    assert lines == ["interrupted: 1 of 3 outfits done; run the same command to continue"]
    assert "Traceback" not in err
    assert stopped_in < 30, stopped_in  # not the whole second outfit; the PNG check below is the exact one
    assert manifest.read_text().count("\n") == 1
    assert [p.name.split("_")[0] for p in (base / "output" / "b3").glob("*.png")] == ["a"]  # nothing partial
