"""How the test command finds its ComfyUI host: the pin, the extraction into the cache, the one-line skip, CI's failure.

Host-free: these run on a fake archive, so they hold wherever the suite runs.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

import host as host_mod

TESTS = Path(__file__).resolve().parent


def _fake_comfyui_archive(path: Path, folder: str) -> None:
    """A tar.gz laid out like ComfyUI's source archive: one top folder with comfy/model_patcher.py and execution.py."""
    with tarfile.open(path, "w:gz") as tar:
        for name, text in ((f"{folder}/comfy/model_patcher.py", b"# fake\n"), (f"{folder}/execution.py", b"# fake\n"),
                           (f"{folder}/requirements.txt", b"numpy\n")):
            info = tarfile.TarInfo(name)
            info.size = len(text)
            tar.addfile(info, io.BytesIO(text))


@pytest.fixture
def pinned(tmp_path, monkeypatch):
    """host.py pointed at a fake shared/host and an empty cache; no COMFYUI_PATH."""
    shared = tmp_path / "shared" / "host"
    shared.mkdir(parents=True)
    monkeypatch.setattr(host_mod, "SHARED_HOST", shared)
    monkeypatch.setattr(host_mod, "CACHE", tmp_path / "cache")
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    monkeypatch.delenv("ANYDRESSING_HOST", raising=False)
    return shared


def test_the_pins_name_the_oldest_and_newest_shared_archives(monkeypatch):
    pins = host_mod.pinned_versions()
    assert [tag for tag, _ in pins] == ["v0.3.64", "v0.8.0"]  # oldest supported first, newest available last
    for tag, commit in pins:
        assert len(commit) == 40 and int(commit, 16) >= 0
        archive, target = host_mod.pinned_paths(tag)
        version = tag[1:]
        assert archive.name == f"ComfyUI-{version}.tar.gz" and archive.parent == host_mod.SHARED_HOST
        assert target == host_mod.REPO / ".comfyui" / f"ComfyUI-{version}"
        # the cache is git-ignored, so an extracted host never lands in a commit
        ignored = subprocess.run(["git", "-C", str(host_mod.REPO), "check-ignore", "-q", str(target / "main.py")])
        assert ignored.returncode == 0
    monkeypatch.delenv("ANYDRESSING_HOST", raising=False)
    assert host_mod.selected_tag() == "v0.3.64"
    monkeypatch.setenv("ANYDRESSING_HOST", "v0.8.0")
    assert host_mod.pinned_paths()[1].name == "ComfyUI-0.8.0"
    monkeypatch.setenv("ANYDRESSING_HOST", "v0.9")
    with pytest.raises(RuntimeError, match=r"ANYDRESSING_HOST=v0.9 is not pinned in tests/comfyui.version "
                                           r"\(v0.3.64, v0.8.0\)"):
        host_mod.selected_tag()


def test_pyproject_states_the_tested_range():
    text = (host_mod.REPO / "pyproject.toml").read_text()
    pins = host_mod.pinned_versions()
    assert f'requires-comfyui = ">={pins[0][0].lstrip("v")}"' in text
    assert f"tested on ComfyUI {pins[0][0]} and {pins[-1][0]}" in text


def test_extracted_once_into_the_cache(pinned):
    archive, target = host_mod.pinned_paths()
    _fake_comfyui_archive(archive, "ComfyUI")
    assert host_mod.find_comfyui() == target
    assert (target / "comfy" / "model_patcher.py").read_text() == "# fake\n"
    (target / "marker").write_text("kept")  # a second call reuses the extraction
    assert host_mod.find_comfyui() == target and (target / "marker").read_text() == "kept"
    assert sorted(p.name for p in host_mod.CACHE.iterdir()) == [target.name]  # no temporary folder left


def test_an_interrupted_extraction_is_redone(pinned):
    archive, target = host_mod.pinned_paths()
    _fake_comfyui_archive(archive, "ComfyUI")
    (target / "comfy").mkdir(parents=True)  # half a tree: no model_patcher.py, no execution.py
    assert host_mod.find_comfyui() == target and (target / "execution.py").is_file()


def test_an_archive_without_comfyui_is_refused(pinned):
    archive, _ = host_mod.pinned_paths()
    _fake_comfyui_archive(archive, "ComfyUI/nested")
    with pytest.raises(RuntimeError, match=r"does not hold one ComfyUI folder \(found \['ComfyUI'\]\)"):
        host_mod.find_comfyui()


def test_comfyui_path_wins_over_the_pin(pinned, tmp_path, monkeypatch):
    archive, target = host_mod.pinned_paths()
    _fake_comfyui_archive(archive, "ComfyUI")
    own = tmp_path / "own" / "ComfyUI"
    (own / "comfy").mkdir(parents=True)
    (own / "comfy" / "model_patcher.py").write_text("")
    (own / "execution.py").write_text("")
    monkeypatch.setenv("COMFYUI_PATH", str(own))
    assert host_mod.find_comfyui() == own.resolve() and not target.exists()
    monkeypatch.setenv("COMFYUI_PATH", str(tmp_path / "nowhere"))
    assert host_mod.find_comfyui() is None
    assert host_mod.why_no_host() == (f"COMFYUI_PATH={tmp_path / 'nowhere'} is not a ComfyUI checkout "
                                      "(no comfy/model_patcher.py and execution.py)")


def test_without_the_shared_folder_one_line_says_how_to_get_a_host(pinned):
    tag = host_mod.selected_tag()
    assert host_mod.find_comfyui() is None
    why = host_mod.why_no_host()
    assert "\n" not in why
    assert why.endswith(f"get the pinned one with `git clone --depth 1 --branch {tag} "
                        f"https://github.com/Comfy-Org/ComfyUI ComfyUI` and set COMFYUI_PATH=$PWD/ComfyUI")


def _pytest(env_extra: dict, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env.update(env_extra)
    return subprocess.run([sys.executable, "-m", "pytest", *args], cwd=TESTS, env=env,
                          capture_output=True, text=True, timeout=300)


def test_no_host_skips_host_tests_with_one_line_but_fails_under_ci(tmp_path):
    nowhere = str(tmp_path / "nowhere")
    r = _pytest({"COMFYUI_PATH": nowhere}, "test_host_install.py")
    assert r.returncode == 0, r.stdout[-2000:]
    why = f"COMFYUI_PATH={nowhere} is not a ComfyUI checkout (no comfy/model_patcher.py and execution.py)"
    assert f"ComfyUI host: none: {why}" in r.stdout
    skips = [line for line in r.stdout.splitlines() if line.startswith("SKIPPED [")]
    assert skips and all(line.endswith(f"test_host_install.py: {why}") for line in skips), skips
    assert " passed" not in r.stdout
    r = _pytest({"COMFYUI_PATH": nowhere, "CI": "true"}, "test_host_install.py")
    assert r.returncode != 0
    assert f"CI must run the host tests, and there is no host: {why}" in r.stdout + r.stderr


def test_run_sh_fails_under_ci_without_a_host(tmp_path):
    """The README's command itself refuses to go on without a host under CI (reusing this test environment)."""
    env = dict(os.environ, CI="true", COMFYUI_PATH=str(tmp_path / "nowhere"), ANYDRESSING_VENV=sys.prefix)
    r = subprocess.run(["bash", str(TESTS / "run.sh"), "-x"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1
    assert r.stderr.splitlines()[-2:] == [
        f"CI: COMFYUI_PATH={tmp_path / 'nowhere'} is not a ComfyUI checkout (no comfy/model_patcher.py and execution.py)",
        "CI must run the host tests: a missing host is a failure here."]


def test_a_local_clone_finds_the_shared_host_beside_its_origin(tmp_path):
    """`git clone -q . "$(mktemp -d)"` has no ../shared of its own; the checkout it came from has."""
    (tmp_path / "work" / "shared" / "host").mkdir(parents=True)
    origin, clone = tmp_path / "work" / "main", tmp_path / "elsewhere" / "clone"
    subprocess.run(["git", "init", "-q", str(origin)], check=True)
    subprocess.run(["git", "clone", "-q", str(origin), str(clone)], check=True, capture_output=True)
    assert host_mod.shared_host_dir(clone) == tmp_path / "work" / "shared" / "host"
    assert host_mod.shared_host_dir(origin) == tmp_path / "work" / "shared" / "host"
    subprocess.run(["git", "-C", str(clone), "remote", "remove", "origin"], check=True)
    assert host_mod.shared_host_dir(clone) == tmp_path / "elsewhere" / "shared" / "host"  # none: the usual place
