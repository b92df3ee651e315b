"""Batch dressing throughput with one and with two local ComfyUI servers, as a ratio from one run.

    python bench/batch_servers.py --comfyui ~/ComfyUI                       # toy: the tests' tiny SD1.5-layout model
    python bench/batch_servers.py --comfyui ~/ComfyUI --workflow wf.json --checkpoint my_sd15.safetensors \\
        --gpus 0,1                                                          # real: one server per GPU

The same outfits (distinct seeds, so ComfyUI's cache cannot skip the sampling) go through tools/batch_dress.py with
one --server, then with two; each server is ComfyUI's own main.py. On a CPU the two servers share the cores (each gets
half the threads): the ratio then shows the client's overhead and scheduling, not a GPU's worth of speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "tools"), str(REPO / "tests"), str(REPO)]

from local_comfy import LocalComfyUI  # noqa: E402


def toy_setup(work: Path, outfits: int, steps: int) -> tuple[Path, Path]:
    """A workflow of the tests' fixture nodes (tiny model, 64x64) and a CSV of `outfits` rows over 2 garment sets."""
    import numpy as np
    from PIL import Image

    import graphs

    wf = graphs.dressing_prompt(garments=((1, "upper"), (2, "lower")), latent_w=64, latent_h=64, steps=steps)
    wf.pop("capture")
    wf["decode"] = {"class_type": "VAEDecode", "inputs": {"samples": ["sampler", 0], "vae": ["vae", 0]}}
    wf["save"] = {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": "bench"}}
    (work / "wf.json").write_text(json.dumps(wf))
    rng = np.random.default_rng(0)
    for name in ("tee", "shirt", "jeans"):
        Image.fromarray((rng.random((96, 72, 3)) * 255).astype(np.uint8)).save(work / f"{name}.png")
    rows = [f"o{i},{('tee', 'shirt')[i % 2]}.png,jeans.png,,{i}" for i in range(outfits)]
    (work / "outfits.csv").write_text("id,upper,lower,prompt,seed\n" + "\n".join(rows) + "\n")
    return work / "wf.json", work / "outfits.csv"


def server_base(work: Path, name: str, toy: bool) -> Path:
    base = work / name
    (base / "custom_nodes").mkdir(parents=True)
    (base / "custom_nodes" / "ComfyUI-AnyDressing").symlink_to(REPO, target_is_directory=True)
    if toy:
        (base / "custom_nodes" / "anydressing_test_fixtures").symlink_to(REPO / "tests" / "fixture_pack",
                                                                          target_is_directory=True)
    return base


def run_batch(urls: list[str], wf: Path, csv: Path, out: Path, extra: list[str]) -> float:
    cmd = [sys.executable, str(REPO / "tools" / "batch_dress.py"), "--workflow", str(wf), "--outfits", str(csv),
           "--output-dir", str(out), "--out", f"bench{len(urls)}", *extra]
    for url in urls:
        cmd += ["--server", url]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    took = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(r.stdout + r.stderr[-3000:])
    print("   " + r.stdout.strip().splitlines()[-1])
    return took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--comfyui", required=True, help="a ComfyUI folder (its main.py is started)")
    ap.add_argument("--outfits", type=int, default=24)
    ap.add_argument("--steps", type=int, default=8, help="KSampler steps (toy workflow)")
    ap.add_argument("--workflow", help="a real workflow (default: the toy one)")
    ap.add_argument("--checkpoint", help="with --workflow: the checkpoint for it")
    ap.add_argument("--csv", help="with --workflow: the outfits CSV")
    ap.add_argument("--gpus", help="CUDA devices for the two servers, e.g. 0,1 (default: the CPU)")
    args, comfy_flags = ap.parse_known_args()
    comfy_flags = [f for f in comfy_flags if f != "--"]
    import host as test_host

    test_host.add_shims_if_needed()  # torchvision/torchaudio import stand-ins where they are not installed
    work = test_host.scratch_dir("anydressing-bench-")  # removed on exit (ANYDRESSING_KEEP_TMP=1 keeps it)
    toy = args.workflow is None
    if toy:
        wf, csv = toy_setup(work, args.outfits, args.steps)
        extra = []
        comfy_flags = comfy_flags or ["--cpu"]
    else:
        wf, csv, extra = Path(args.workflow), Path(args.csv), ["--checkpoint", args.checkpoint]
    gpus = args.gpus.split(",") if args.gpus else None
    cores = os.cpu_count() or 1
    results = {}
    for count in (1, 2):
        servers = []
        try:
            for i in range(count):
                env_threads = str(max(1, cores // count))
                os.environ["OMP_NUM_THREADS"] = env_threads  # the child inherits it
                if gpus:
                    os.environ["CUDA_VISIBLE_DEVICES"] = gpus[i % len(gpus)]
                flags = comfy_flags + ["--database-url", "sqlite:///:memory:"]
                if toy:
                    flags += ["--base-directory", str(server_base(work, f"s{count}_{i}", toy))]
                log = open(work / f"server{count}_{i}.log", "w")
                servers.append(LocalComfyUI(Path(args.comfyui), flags, log=log).start())
            print(f"{count} server(s), {cores // count} thread(s) each:")
            run_batch([s.url for s in servers], wf, csv, work / "warm", extra + ["--limit", str(2 * count)])  # loads
            took = run_batch([s.url for s in servers], wf, csv, work / "out", extra)
        finally:
            for s in servers:
                s.stop()
        n = args.outfits if toy else sum(1 for _ in open(csv)) - 1
        results[count] = n / took * 60
        print(f"   {n} outfits in {took:.1f} s: {results[count]:.1f} outfits/min")
    print(f"two servers / one server: {results[2] / results[1]:.2f}x")


if __name__ == "__main__":
    main()
