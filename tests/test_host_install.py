"""Host: the README's install steps, run as written in a fresh ComfyUI folder, then ComfyUI starts with the pack."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import host as host_mod

pytestmark = pytest.mark.host

REPO = Path(__file__).resolve().parent.parent
REPO_URL = "https://github.com/ComfyUI-AnyDressing/ComfyUI-AnyDressing"


def readme_install_commands() -> tuple[str, str]:
    text = (REPO / "README.md").read_text()
    block = re.search(r"\*\*git clone\*\*.*?```bash\n(.*?)```", text, re.S).group(1).strip().splitlines()
    assert len(block) == 2, block
    return block[0], block[1]


def test_readme_install_steps_in_a_fresh_comfyui(host):
    if subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True).returncode != 0:
        pytest.skip("the pack is not a git checkout with a commit; nothing to clone")
    install, start = readme_install_commands()
    assert REPO_URL in install and start.startswith("python ComfyUI/main.py")
    work = host_mod.scratch_dir("anydressing-install-")
    top = {"custom_nodes", "models", "output", "input", "user", "temp"}

    def fresh(directory, names):  # the code only: no packs, models or outputs of the host
        return [n for n in names if n == "__pycache__" or (Path(directory) == Path(host.root) and n in top)]

    shutil.copytree(host.root, work / "ComfyUI", ignore=fresh)
    (work / "ComfyUI" / "custom_nodes").mkdir()
    env = dict(os.environ)
    host_mod.add_shims_if_needed()
    env["PYTHONPATH"] = os.environ.get("PYTHONPATH", "")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # `python`/`pip` of this environment
    # exactly as written, with the repository URL pointing at this checkout
    r = subprocess.run(install.replace(REPO_URL, str(REPO)), shell=True, cwd=work, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    pack = work / "ComfyUI" / "custom_nodes" / "ComfyUI-AnyDressing"
    assert (pack / "__init__.py").is_file() and (pack / "web" / "docs").is_dir()
    # the start command, plus what this test machine needs (no GPU, exit once started)
    r = subprocess.run(start + " --cpu --quick-test-for-ci --database-url sqlite:///:memory:", shell=True, cwd=work,
                       env=env, capture_output=True, text=True, timeout=300)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-3000:]
    lines = [line for line in log.splitlines() if str(pack) in line]
    assert any("seconds:" in line and "IMPORT FAILED" not in line for line in lines), log[-3000:]
    assert not [line for line in log.splitlines() if "Traceback" in line or "IMPORT FAILED" in line]



def test_any_folder_name(host):
    """custom_nodes/<any folder name>: a dot and a space in the name still load (ComfyUI mangles dots)."""
    base = host_mod.scratch_dir("anydressing-folder-")
    (base / "custom_nodes").mkdir()
    folder = base / "custom_nodes" / "my.dressing pack"
    shutil.copytree(REPO, folder, ignore=shutil.ignore_patterns(".venv*", ".git", "__pycache__", ".comfyui", "node_modules",
                                                             ".pytest_cache"))
    env = dict(os.environ)
    host_mod.add_shims_if_needed()
    env["PYTHONPATH"] = os.environ.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "main.py", "--cpu", "--quick-test-for-ci", "--base-directory", str(base),
                          "--database-url", "sqlite:///:memory:"], cwd=host.root, env=env, capture_output=True,
                         text=True, timeout=300)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-3000:]
    assert any(str(folder) in line and "seconds:" in line and "IMPORT FAILED" not in line for line in log.splitlines())
