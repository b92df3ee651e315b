"""Host-free: the benchmarks' CPU peak memory is per case (reset between cases), not the process's lifetime peak."""

from __future__ import annotations

import sys

import pytest
import torch

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import peak_memory  # noqa: E402

CPU = torch.device("cpu")


CHECK = """
import sys, torch
sys.path.insert(0, sys.argv[1])
import peak_memory
cpu = torch.device("cpu")
peak_memory.reset(cpu)
before = peak_memory.peak_mib(cpu)
block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched so it is resident
block += 1
during = peak_memory.peak_mib(cpu)
del block
peak_memory.reset(cpu)
after = peak_memory.peak_mib(cpu)
print(before, during, after, peak_memory.kind(cpu))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the resettable CPU peak uses Linux's /proc")
def test_cpu_peak_sees_an_allocation_and_resets_after_it():
    # in a fresh process: a test worker that already freed big blocks may hand the 64 MiB back from memory that is
    # still resident, so its peak would not move (seen under pytest-xdist)
    import subprocess

    r = subprocess.run([sys.executable, "-c", CHECK, str(REPO / "bench")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    before, during, after, kind = r.stdout.split(maxsplit=3)
    before, during, after = float(before), float(during), float(after)
    assert during - before >= 60, (before, during)
    assert during - after >= 60, (during, after)  # the freed block no longer counts after a reset
    assert kind.strip() == "resident (CPU process)"
