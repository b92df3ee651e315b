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


def pytest_report_header(config):
    root = host_mod.find_comfyui()
    return f"ComfyUI host: {root}" if root else f"ComfyUI host: none: {host_mod.why_no_host()}"


def pytest_collection_modifyitems(config, items):
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


@pytest.fixture
def store(host):
    import adtest_tiny

    adtest_tiny.STORE.clear()
    return adtest_tiny.STORE
