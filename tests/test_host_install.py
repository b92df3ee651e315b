"""Host: the README's install steps (git clone into custom_nodes/, any folder name), then ComfyUI starts with the pack."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import host as host_mod

pytestmark = pytest.mark.host

REPO = Path(__file__).resolve().parent.parent


def test_git_clone_into_custom_nodes_and_start(host):
    if subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True).returncode != 0:
        pytest.skip("the pack is not a git checkout with a commit; nothing to clone")
    base = Path(tempfile.mkdtemp(prefix="anydressing-install-"))
    (base / "custom_nodes").mkdir()
    folder = base / "custom_nodes" / "my.dressing pack"  # any folder name, even with a dot and a space
    subprocess.run(["git", "clone", "-q", str(REPO), str(folder)], check=True)
    assert (folder / "requirements.txt").read_text().split() == ["safetensors", "einops", "numpy", "pillow"]
    env = dict(os.environ)
    host_mod.add_shims_if_needed()
    env["PYTHONPATH"] = os.environ.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "main.py", "--cpu", "--quick-test-for-ci", "--base-directory", str(base),
                          "--database-url", "sqlite:///:memory:"], cwd=host.root, env=env, capture_output=True,
                         text=True, timeout=300)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-3000:]
    lines = [line for line in log.splitlines() if str(folder) in line]
    assert any("seconds:" in line and "IMPORT FAILED" not in line for line in lines), log[-3000:]
    assert not [line for line in log.splitlines() if "Traceback" in line or "IMPORT FAILED" in line]
