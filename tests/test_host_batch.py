"""Host: the batch dressing command with the ComfyUI it starts: CSV and folder outfits, resume, reuse; the README's
batch and conversion commands run as written in a fresh ComfyUI folder with a random SD1.5 checkpoint."""

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
    base = host_mod.scratch_dir("anydressing-batch-")
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


def test_csv_outfits_limit_and_reuse(host, setup):
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
    # resuming after an interruption: test_readme_command_on_a_fresh_comfyui_dresses_3_outfits_and_resumes_after_ctrl_c
    done = [json.loads(line)["id"] for line in (base / "output" / "b1" / "done.jsonl").read_text().splitlines()]
    assert done == ["a", "b"]


def test_garment_folder_combinations(host, setup):
    base, work = setup
    out = batch(host, base, "--workflow", str(work / "workflow.json"), "--garments", str(work / "garments"),
                "--seeds", "0,7", "--out", "b2")
    assert "4 outfits: 0 done, 4 to do" in out  # 2 uppers x 1 lower x 2 seeds
    assert "Encode Garments ran 2 time(s)" in out  # one per garment set, shared by both seeds
    names = sorted(p.name.rsplit("_", 2)[0] for p in (base / "output" / "b2").glob("*.png"))
    assert names == ["shirt_jeans_s0", "shirt_jeans_s7", "tee_jeans_s0", "tee_jeans_s7"]


README = host_mod.REPO / "README.md"
SMALL_SD15 = Path(tempfile.gettempdir()) / "anydressing-test-small-sd15-v1.safetensors"
# The knobs a CPU needs to dress in seconds; appended to the README's command (ComfyUI's flags after "--").
FAST = ["--width", "64", "--height", "64", "--garment-size", "64x96", "--cfg", "4.5", "--sampler", "euler",
        "--strength", "0.6", "--garments-net", "training-free"]
COMFY_FLAGS = ["--", "--cpu", "--use-pytorch-cross-attention"]


def readme_command() -> list[str]:
    """The batch command exactly as the README writes it."""
    import shlex

    line = next(l for l in README.read_text().splitlines()
                if l.startswith("python custom_nodes/ComfyUI-AnyDressing/tools/batch_dress.py"))
    cmd = shlex.split(line)
    return [sys.executable] + cmd[1:]


@pytest.fixture(scope="module")
def fresh(host):
    """A fresh ComfyUI folder (a copy of the host's code, nothing installed) with this pack in custom_nodes/, the
    checkpoint the README's command names (a random SD1.5 checkpoint: ComfyUI detects it as SD1.5; its UNet keeps
    320 channels at every level to stay small), a decoy checkpoint that sorts first, and a 3-outfit CSV."""
    import shutil

    from test_slow_fullsize import write_random_sd15_checkpoint

    if not SMALL_SD15.is_file():  # deterministic: built once per machine
        part = SMALL_SD15.with_suffix(f".{os.getpid()}.part")
        write_random_sd15_checkpoint(part, channel_mult=[1, 1, 1, 1])
        os.replace(part, SMALL_SD15)
    top_skip = {"custom_nodes", "models", "input", "output", "temp", "user", ".git"}
    root = host_mod.scratch_dir("anydressing-fresh-") / "ComfyUI"
    shutil.copytree(host.root, root, ignore=lambda d, names: [n for n in names if n == "__pycache__" or
                                                             (Path(d) == host.root and n in top_skip)])
    (root / "custom_nodes").mkdir()
    (root / "custom_nodes" / host_mod.PACK_LINK_NAME).symlink_to(host_mod.REPO, target_is_directory=True)
    (root / "models" / "checkpoints").mkdir(parents=True)
    (root / "models" / "checkpoints" / "my_sd15.safetensors").symlink_to(SMALL_SD15)
    (root / "models" / "checkpoints" / "aaa_decoy.safetensors").write_bytes(b"not a checkpoint")
    rng = np.random.default_rng(1)
    (root / "garments").mkdir()
    for name in ("tee", "shirt", "jeans", "skirt"):
        Image.fromarray((rng.random((120, 90, 3)) * 255).astype(np.uint8)).save(root / "garments" / f"{name}.png")
    (root / "outfits.csv").write_text("id,upper,lower,prompt,seed\n"
                                      "a,garments/tee.png,garments/jeans.png,,0\n"
                                      "b,garments/tee.png,garments/jeans.png,a woman in a park,1\n"
                                      "c,garments/shirt.png,garments/skirt.png,,2\n")
    host_mod.add_shims_if_needed()
    yield root
    shutil.rmtree(root.parent, ignore_errors=True)


def start(root: Path, cmd: list[str], log: Path) -> subprocess.Popen:
    """The command as a user runs it: from the ComfyUI folder; stderr (ComfyUI's log, progress bars) to a file."""
    return subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, stderr=open(log, "w"), text=True,
                            env=dict(os.environ))


def wait_for_record(proc: subprocess.Popen, manifest: Path, log: Path, n: int = 1) -> None:
    import time

    deadline = time.time() + 300
    while not (manifest.exists() and manifest.read_text().count("\n") >= n):
        assert proc.poll() is None, proc.stdout.read() + log.read_text()[-3000:]
        assert time.time() < deadline
        time.sleep(0.02)


def test_readme_command_on_a_fresh_comfyui_dresses_3_outfits_and_resumes_after_ctrl_c(fresh):
    """The README's command with the checkpoint it names: Ctrl-C during the second outfit, then the same command
    does the rest. The PNGs' own prompt metadata shows every option reached the executed workflow."""
    import signal
    import time

    root = fresh
    cmd = readme_command() + ["--steps", "4"] + FAST + COMFY_FLAGS
    assert "--checkpoint" in cmd and cmd[cmd.index("--checkpoint") + 1] == "my_sd15.safetensors"
    out_dir = root / "output" / "summer"
    log = root / "run1.log"
    proc = start(root, cmd, log)
    wait_for_record(proc, out_dir / "done.jsonl", log)
    t0 = time.time()
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    err = log.read_text()
    assert proc.returncode == 130, out + err[-3000:]
    assert time.time() - t0 < 30  # at the next step, not after the whole outfit; the PNG check below is exact
    assert [l for l in (out + err).splitlines() if l.startswith("interrupted")] == [
        "interrupted: 1 of 3 outfits done; run the same command to continue"]
    assert "Traceback" not in err
    assert [p.name.split("_")[0] for p in out_dir.glob("*.png")] == ["a"]  # nothing partial for b

    r = subprocess.run(cmd, cwd=root, capture_output=True, text=True, env=dict(os.environ), timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert "3 outfits: 1 done, 2 to do" in r.stdout
    assert "done: 2 outfits, Encode Garments ran 2 time(s)" in r.stdout  # a new process: b's set and c's
    for text in (err, r.stdout + r.stderr):  # the workflow's placeholder garments are never looked at
        assert "garment_upper.png" not in text and "Failed to validate" not in text and "first one found" not in text
    done = [json.loads(l)["id"] for l in (out_dir / "done.jsonl").read_text().splitlines()]
    assert done == ["a", "b", "c"]
    images = sorted(out_dir.glob("*.png"))
    assert [p.name.split("_")[0] for p in images] == ["a", "b", "c"]
    wf_ks = json.loads((host_mod.REPO / "workflows" / "anydressing_upper_lower.json").read_text())
    for path in images:
        im = Image.open(path)
        assert im.size == (64, 64)
        prompt = json.loads(im.info["prompt"])  # what ComfyUI executed (its SaveImage ran as PreviewImage)
        by_type = {}
        for node in prompt.values():
            by_type.setdefault(node["class_type"], []).append(node["inputs"])
        assert [n["ckpt_name"] for n in by_type["CheckpointLoaderSimple"]] == ["my_sd15.safetensors"]
        ks = by_type["KSampler"][0]
        assert (ks["steps"], ks["cfg"], ks["sampler_name"]) == (4, 4.5, "euler")
        assert ks["scheduler"] == next(n for n in wf_ks["nodes"] if n["type"] == "KSampler")["widgets_values"][5]
        assert [(n["width"], n["height"]) for n in by_type["EmptyLatentImage"]] == [(64, 64)]
        assert [(n["width"], n["height"]) for n in by_type["AnyDressingEncodeGarments"]] == [(64, 96)]
        assert by_type["AnyDressingApplyDressingAttention"][0]["strength"] == 0.6
        assert by_type["AnyDressingLoadGarmentsNet"][0]["garments_net_name"] == "training-free"
        loads = sorted(n["image"] for n in by_type["LoadImage"])
        assert len(loads) == 2 and all(i.startswith("anydressing_batch/") for i in loads)  # only the CSV's
        meta = json.loads(im.info["anydressing_outfit"])
        assert ks["seed"] == meta["seed"] == {"a": 0, "b": 1, "c": 2}[meta["id"]]


def comfyui_children(root: Path) -> list:
    """ComfyUI processes started in `root` (the local server the command starts runs main.py there)."""
    import psutil

    found = []
    for p in psutil.process_iter(["cmdline", "cwd"]):
        if "main.py" in (p.info.get("cmdline") or []) and p.info.get("cwd") == str(root):
            found.append(p)
    return found


def test_fallback_checkpoint_and_a_second_ctrl_c_exits_at_once(fresh):
    """Without --checkpoint, the workflow's missing checkpoint becomes the first one found, with a line saying so.
    Two Ctrl-Cs in a row: the second exits at once, and the ComfyUI the command started goes with it."""
    import signal
    import time

    root = fresh
    (root / "models" / "checkpoints" / "aaa_decoy.safetensors").unlink(missing_ok=True)
    cmd = readme_command()
    i = cmd.index("--checkpoint")
    del cmd[i:i + 2]
    cmd[cmd.index("--out") + 1] = "winter"
    cmd += FAST[:6] + ["--steps", "2"] + COMFY_FLAGS
    log = root / "run3.log"
    proc = start(root, cmd, log)
    said = []
    while not said or not said[-1].startswith("3 outfits"):
        said.append(proc.stdout.readline())
        assert said[-1], log.read_text()[-3000:]
    assert said[-2:] == [
        "the workflow's checkpoint v1-5-pruned-emaonly-fp16.safetensors is not in models/checkpoints; using "
        "my_sd15.safetensors, the first one found (choose with --checkpoint NAME)\n", "3 outfits: 0 done, 3 to do\n"]
    assert comfyui_children(root)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    t0 = time.time()
    out, _ = proc.communicate(timeout=60)
    assert time.time() - t0 < 3
    err = log.read_text()
    assert proc.returncode == 130 and "Traceback" not in err
    out_dir = root / "output" / "winter"
    assert not (out_dir / "done.jsonl").exists() and list(out_dir.glob("*.png")) == []
    deadline = time.time() + 5
    while comfyui_children(root) and time.time() < deadline:  # killed, and gone once the kernel reaped it
        time.sleep(0.05)
    assert comfyui_children(root) == []


def test_override_without_its_node_is_one_line_before_comfyui_starts(fresh):
    inpaint = "custom_nodes/ComfyUI-AnyDressing/workflows/anydressing_inpaint_person.json"
    cmd = readme_command()
    cmd[cmd.index("--workflow") + 1] = inpaint
    r = subprocess.run(cmd + ["--width", "64"], cwd=fresh, capture_output=True, text=True, env=dict(os.environ),
                       timeout=120)
    assert (r.returncode, r.stdout, r.stderr) == (
        1, "", "--width: the workflow anydressing_inpaint_person.json has no EmptyLatentImage node to set; drop "
               "--width or use a workflow that has one\n")
    api_wf = fresh / "no_gnet.json"  # an API prompt without Load GarmentsNet
    api_wf.write_text(json.dumps({"1": {"class_type": "AnyDressingEncodeGarments", "inputs": {}}}))
    cmd[cmd.index("--workflow") + 1] = str(api_wf)
    i = cmd.index("--checkpoint")
    del cmd[i:i + 2]
    r = subprocess.run(cmd + ["--garments-net", "x.safetensors"], cwd=fresh, capture_output=True, text=True,
                       env=dict(os.environ), timeout=120)
    assert r.returncode == 1 and r.stderr.splitlines() == [
        "--garments-net: the workflow no_gnet.json has no AnyDressingLoadGarmentsNet node to set; drop "
        "--garments-net or use a workflow that has one"]


def test_validation_errors_are_lines_naming_node_input_and_reason(fresh):
    import comfy.samplers

    cmd = readme_command() + FAST[:6] + ["--sampler", "dpm", "--out", "bad"] + COMFY_FLAGS
    r = subprocess.run(cmd, cwd=fresh, capture_output=True, text=True, env=dict(os.environ), timeout=300)
    assert r.returncode == 1
    names = list(comfy.samplers.KSampler.SAMPLERS)  # the choices, read from ComfyUI itself
    shown = ", ".join(names[:30]) + (f", ... ({len(names)} in all)" if len(names) > 30 else "")
    tail = r.stderr.rstrip("\n").splitlines()[-2:]
    assert tail == ["outfit a: the workflow does not validate:",
                    f"  node 10 (KSampler), input sampler_name: 'dpm' is not one of: {shown}"]
    assert "{" not in "\n".join(tail)
    assert not (fresh / "output" / "bad" / "done.jsonl").exists()


def test_the_docs_workflow_to_api_command_on_a_fresh_comfyui(fresh, host):
    """The batch page's conversion command, from the ComfyUI folder (it starts that ComfyUI for /object_info)."""
    import shlex
    import shutil

    from anydressing_core.workflow_api import to_api

    line = next(l for l in (host_mod.REPO / "docs" / "batch.md").read_text().splitlines()
                if l.startswith("python custom_nodes/ComfyUI-AnyDressing/tools/workflow_to_api.py"))
    cmd = [sys.executable] + shlex.split(line)[1:] + COMFY_FLAGS
    src = host_mod.REPO / "workflows" / "anydressing_with_lora.json"
    shutil.copyfile(src, fresh / "my_workflow.json")
    r = subprocess.run(cmd, cwd=fresh, capture_output=True, text=True, env=dict(os.environ), timeout=300)
    assert r.returncode == 0 and r.stdout == "", r.stdout + r.stderr[-3000:]
    api = json.loads((fresh / "my_workflow_api.json").read_text())
    assert r.stderr.splitlines()[-1] == f"wrote my_workflow_api.json: {len(json.loads(src.read_text())['nodes'])} nodes"
    nodes = host.nodes
    assert api == to_api(json.loads(src.read_text()), nodes.NODE_CLASS_MAPPINGS, nodes.NODE_DISPLAY_NAME_MAPPINGS)


def test_checkpoint_choice_and_size_overrides_reach_every_node_they_name():
    """The parts of the command that need no ComfyUI: --checkpoint checked against what is installed, the fallback
    when nothing is, and --width/--height reaching Garment Masks too (the pose workflow's masks match the image)."""
    import argparse

    sys.path.append(str(TOOL.parent))
    import batch_workflow as bd
    api = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "v1-5.safetensors"}},
           "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 576, "height": 768, "batch_size": 1}},
           "3": {"class_type": "AnyDressingGarmentMasks", "inputs": {"width": 576, "height": 768, "grow": 0}},
           "4": {"class_type": "AnyDressingEncodeGarments", "inputs": {"width": 576, "height": 768}}}
    with pytest.raises(SystemExit) as e:
        bd.resolve_checkpoint(api, "nope.safetensors", ["a.safetensors", "b.safetensors"])
    assert str(e.value) == ("--checkpoint nope.safetensors: not in ComfyUI's models/checkpoints (found: "
                            "a.safetensors, b.safetensors)")
    with pytest.raises(SystemExit) as e:
        bd.resolve_checkpoint(api, None, [])
    assert str(e.value) == ("the workflow's checkpoint v1-5.safetensors is not in ComfyUI's models/checkpoints and no "
                            "other checkpoint is there: put an SD1.5 checkpoint there (or pass --checkpoint NAME)")
    assert bd.resolve_checkpoint(api, None, ["v1-5.safetensors"]) == [] and api["1"]["inputs"]["ckpt_name"] == \
        "v1-5.safetensors"
    args = argparse.Namespace(**{k: None for k in bd.OVERRIDES})
    args.width, args.height, args.garment_size = 320, 448, (96, 128)
    bd.apply_overrides(api, args)
    assert [(n["inputs"]["width"], n["inputs"]["height"]) for n in api.values() if "width" in n["inputs"]] == [
        (320, 448), (320, 448), (96, 128)]
    assert api["2"]["inputs"]["batch_size"] == 1 and api["3"]["inputs"]["grow"] == 0


def test_the_docs_training_command_on_a_fresh_comfyui_creates_the_output_folder(fresh, tmp_path):
    """The training page's command as written (`~` = the folder holding the fresh ComfyUI, the pack on the path as
    when run from its folder), plus a 2-step run on the CPU: a fresh ComfyUI has no models/anydressing/ yet, and the
    command creates it instead of failing on its log file; it warns of the random VAE's latent scale."""
    import shlex

    from anydressing_core.native_format import read_native

    root = fresh
    line = next(l for l in (host_mod.REPO / "docs" / "training.md").read_text().splitlines()
                if l.startswith("python -m anydressing_train --comfyui"))
    cmd = [sys.executable] + [a.replace("~", str(root.parent), 1) if a.startswith("~") else a
                              for a in shlex.split(line)[1:]]
    ckpt = root / "models" / "checkpoints" / "v1-5-pruned-emaonly.safetensors"
    if not ckpt.exists():
        ckpt.symlink_to(SMALL_SD15)
    from anydressing_train.data import make_synthetic

    make_synthetic(str(tmp_path / "data"), count=3, size=64, layout="random")
    make_synthetic(str(tmp_path / "val"), count=1, size=64, seed=1, layout="random")
    import shutil

    # as on a ComfyUI where the pack has never started (the module's other tests start it in this folder)
    shutil.rmtree(root / "models" / "anydressing", ignore_errors=True)
    host_mod.add_shims_if_needed()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(host_mod.REPO),
                                                                      os.environ.get("PYTHONPATH")]))}
    r = subprocess.run(cmd + ["--steps", "2", "--eval-every", "1", "--rank", "4", "--alpha", "4", "--", "--cpu"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    out = root / "models" / "anydressing" / "my_anydressing.safetensors"
    c = read_native(str(out))
    assert c.metadata["steps"] == "2" and c.metadata["feature_tap"] == "gfe_output"
    log = (root / "models" / "anydressing" / "my_anydressing.safetensors.losses.csv").read_text().splitlines()
    assert log[0].startswith("step,diffusion") and [row.split(",")[0] for row in log[1:]] == ["0", "1", "2"]
    assert "[AnyDressing] training: the training images' latents have std " in r.stdout
