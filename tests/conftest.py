"""Test setup: host-free tests import anydressing_core directly; host tests boot the real ComfyUI once per process."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
for p in (str(REPO), str(TESTS), str(TESTS / "fixture_pack")):
    if p not in sys.path:
        sys.path.insert(0, p)

import host as host_mod  # noqa: E402

# Parallel workers (pytest-xdist, see run.sh) share the cores: each worker and the processes it starts get its share
# of threads, since torch's default (one thread per core in every worker) oversubscribes the CPU and slows all ~10x.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1)
if _WORKERS > 1:
    _THREADS = str(max(1, (os.cpu_count() or 1) // _WORKERS))
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = _THREADS
    import torch  # noqa: E402

    torch.set_num_threads(int(_THREADS))


def pytest_report_header(config):
    root = host_mod.find_comfyui()
    return f"ComfyUI host: {root}" if root else f"ComfyUI host: none: {host_mod.why_no_host()}"


def pytest_collection_modifyitems(config, items):
    if os.environ.get("ANYDRESSING_HOST_ONLY") == "1":
        # a further pinned host (tests/run.sh): the host-free tests already ran with the first
        kept = [item for item in items if "host" in item.keywords]
        config.hook.pytest_deselected(items=[item for item in items if "host" not in item.keywords])
        items[:] = kept
    if host_mod.find_comfyui() is not None:
        return
    if os.environ.get("CI") == "true" and any("host" in item.keywords for item in items):
        raise pytest.UsageError(f"CI must run the host tests, and there is no host: {host_mod.why_no_host()}")
    skip = pytest.mark.skip(reason=host_mod.why_no_host())
    for item in items:
        if "host" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def host():
    return host_mod.boot()


@pytest.fixture(scope="session")
def comfy_server(host):
    """One real ComfyUI server per test process, for the server and browser tests."""
    from comfy_server import Server

    server = Server(host.root, settings={"Comfy.TutorialCompleted": True})
    yield server
    server.stop()


@pytest.fixture
def store(host):
    import adtest_tiny

    adtest_tiny.STORE.clear()
    return adtest_tiny.STORE
