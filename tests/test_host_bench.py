"""Host: the benchmark scripts run (a one-step smoke run; figures come from real runs, not from tests)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import host as host_mod

pytestmark = pytest.mark.host


def test_dressing_bench_smoke(host):
    host_mod.add_shims_if_needed()
    env = dict(os.environ, COMFYUI_PATH=str(host.root))
    r = subprocess.run([sys.executable, str(host_mod.REPO / "bench" / "dressing_bench.py"), "--channels", "32",
                        "--sizes", "64x64", "--garments", "1", "--rows", "2", "--steps", "1", "--repeats", "1",
                        "--no-rerun-baseline"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    rows = [line.split() for line in r.stdout.splitlines() if line.strip().startswith("64x64")]
    assert [row[2] for row in rows] == ["1"]
    assert all(float(row[4]) > 0 and float(row[10]) > 0 for row in rows)  # a ratio and a bank size per case


def test_masked_attention_bench_smoke():
    r = subprocess.run([sys.executable, str(host_mod.REPO / "bench" / "masked_attention.py"), "--latent", "8x6",
                        "--garments", "1,2", "--repeats", "1"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert len([line for line in r.stdout.splitlines() if line.strip()[:1].isdigit()]) == 2


def test_memory_modes_smoke_prints_a_peak_and_compares_runs(host, tmp_path):
    """A plain reference run prints its mode and a positive, per-run peak; comparing a run with itself gives 0."""
    host_mod.add_shims_if_needed()
    script = str(host_mod.REPO / "bench" / "memory_modes.py")
    out = tmp_path / "plain.pt"
    r = subprocess.run([sys.executable, script, "--comfyui", str(host.root), "--channels", "32", "--size", "64x64",
                        "--garments", "2", "--steps", "1", "--dtype", "float32", "--plain", "--out", str(out), "--",
                        "--cpu"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    line = [x for x in r.stdout.splitlines() if x.startswith("mode --cpu: 64x64, plain (no garments), 1 steps")]
    assert line and "vram state DISABLED" in line[0], r.stdout[-2000:]
    peak = float(line[0].split("peak resident (CPU process) ")[1].split(" MiB")[0])
    assert peak > 50, line[0]
    r = subprocess.run([sys.executable, script, "--compare", str(out), str(out)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "plain.pt: max |diff| relative to plain.pt: 0.00e+00", r.stdout
