"""Resettable peak memory for the benchmarks: CUDA's allocator statistics on a GPU, the process's peak resident set on
the CPU (Linux resets it through /proc/self/clear_refs, so each case gets its own peak, not the process's lifetime
maximum)."""

from __future__ import annotations

from pathlib import Path

import torch


def _vm_hwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak resident set size to the current one
    except OSError:
        pass


def peak_mib(device: torch.device) -> float:
    """Peak since the last reset: allocated device memory on CUDA, resident memory (MiB) on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        return _vm_hwm_mib()
    except OSError:
        return float("nan")


def kind(device: torch.device) -> str:
    return "allocated on the GPU" if device.type == "cuda" else "resident (CPU process)"
