"""Host-free: the benchmarks' CPU peak memory is per case (reset between cases), not the process's lifetime peak."""

from __future__ import annotations

import sys

import pytest
import torch

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import peak_memory  # noqa: E402

CPU = torch.device("cpu")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the resettable CPU peak uses Linux's /proc")
def test_cpu_peak_sees_an_allocation_and_resets_after_it():
    peak_memory.reset(CPU)
    before = peak_memory.peak_mib(CPU)
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched so it is resident
    block += 1
    during = peak_memory.peak_mib(CPU)
    del block
    peak_memory.reset(CPU)
    after = peak_memory.peak_mib(CPU)
    assert during - before >= 60, (before, during)
    assert during - after >= 60, (during, after)  # the freed block no longer counts after a reset
    assert peak_memory.kind(CPU) == "resident (CPU process)"
