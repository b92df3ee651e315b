"""Host environment: the batch command refuses bad outfits before it contacts any ComfyUI or uploads anything.

Each refusal is one line naming the row (or option) and the path. The command runs in ComfyUI's environment (it
needs aiohttp), so these run with the host tests; no server is started: --server names a port nothing listens on.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import host as host_mod

pytestmark = pytest.mark.host

TOOL = host_mod.REPO / "tools" / "batch_dress.py"
NOWHERE = "http://127.0.0.1:9"  # the discard port: nothing answers there


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "shoot"
    (d / "g").mkdir(parents=True)
    Image.fromarray((np.random.default_rng(0).random((40, 30, 3)) * 255).astype(np.uint8)).save(d / "g" / "tee.png")
    Image.fromarray(np.zeros((40, 30, 3), dtype=np.uint8)).save(tmp_path / "outside.png")
    (d / "g" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but not really")
    (d / "wf.json").write_text('{"1": {"class_type": "AnyDressingEncodeGarments", "inputs": {}}}')
    return d


def run(folder: Path, rows: str, *extra: str) -> subprocess.CompletedProcess:
    (folder / "outfits.csv").write_text("id,upper,lower\n" + rows)
    cmd = [sys.executable, str(TOOL), "--server", NOWHERE, "--workflow", str(folder / "wf.json"), "--outfits",
           str(folder / "outfits.csv"), "--output-dir", str(folder / "output"), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=dict(os.environ))


def test_paths_outside_the_csv_folder_unreadable_images_and_bad_ids_are_refused(folder):
    outside = (folder.parent / "outside.png").resolve()
    cases = [
        ("a,g/tee.png,../outside.png\n",
         f"outfits.csv: row 1: lower ../outside.png is outside the CSV's folder {folder.resolve()}; move it there or "
         f"pass --allow-paths-outside"),
        (f"a,g/tee.png,{outside}\n",
         f"outfits.csv: row 1: lower {outside} is outside the CSV's folder {folder.resolve()}; move it there or pass "
         f"--allow-paths-outside"),
        ("a,g/tee.png,\nb,g/broken.png,\n",
         f"outfits.csv: row 2, upper: {folder / 'g' / 'broken.png'} is not a readable image (UnidentifiedImageError: "
         f"cannot identify image file '{folder / 'g' / 'broken.png'}')"),
        ("a,g/gone.png,\n", f"outfits.csv: row 1, upper: garment image not found: {folder / 'g' / 'gone.png'}"),
        ("a,g/tee.png,\na,g/tee.png,\n",
         "outfits.csv: row 2: id 'a' is used twice; ids name the images and the resume list"),
        ("x/y,g/tee.png,\n",
         "outfits.csv: row 1: id 'x/y' names the images, so it cannot hold / \\ : * ? \" < > |"),
    ]
    for rows, line in cases:
        r = run(folder, rows)
        assert (r.returncode, r.stdout, r.stderr.splitlines()) == (1, "", [line]), rows
    assert not (folder / "output").exists()  # refused before anything was made


def test_allowed_outside_paths_go_on_to_the_server_and_out_stays_inside_the_output_folder(folder):
    r = run(folder, "a,g/tee.png,../outside.png\n", "--allow-paths-outside")
    assert r.returncode == 1 and r.stderr.splitlines()[-1] == (
        f"no ComfyUI server answers ({NOWHERE}): start one, or check the --server address")
    for out in ("../elsewhere", str(folder.parent / "abs"), "."):
        r = run(folder, "a,g/tee.png,\n", "--out", out)
        assert r.returncode == 1 and r.stderr.splitlines()[-1].startswith(f"--out {out}: "), r.stderr
        assert str((folder / "output").resolve()) in r.stderr
    assert not (folder.parent / "elsewhere").exists() and not (folder.parent / "abs").exists()
