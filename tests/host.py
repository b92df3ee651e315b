"""Find and boot the real ComfyUI host, once per process, for the host tests.

Search order: $COMFYUI_PATH; the ComfyUI whose custom_nodes/ contains this pack; the pinned host (tests/comfyui.version),
extracted once from ../shared/host/ComfyUI-<version>.tar.gz (beside this checkout, or beside the checkout a local
clone was made from) into the git-ignored .comfyui/ComfyUI-<version>/.
~/ComfyUI is deliberately not searched: it may be any version, and a green run on an unknown host proves little.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent
SHIMS = Path(__file__).resolve().parent / "shims"
FIXTURE_PACK = Path(__file__).resolve().parent / "fixture_pack"
PACK_LINK_NAME = "ComfyUI-AnyDressing"
VERSION_FILE = Path(__file__).resolve().parent / "comfyui.version"


def _local_origin(repo: Path) -> Optional[Path]:
    """The checkout a local clone (`git clone . DIR`) was made from, if its origin is a folder on this machine."""
    import subprocess

    try:
        url = subprocess.run(["git", "-C", str(repo), "config", "--get", "remote.origin.url"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    if not url or "://" in url and not url.startswith("file://") or (":" in url and "@" in url):
        return None
    path = Path(url[len("file://"):] if url.startswith("file://") else url)
    path = path if path.is_absolute() else (repo / path)
    return path.resolve() if path.is_dir() else None


def shared_host_dir(repo: Path) -> Path:
    """../shared/host beside this checkout; for a local clone, beside the checkout it was cloned from (so
    `git clone -q . "$(mktemp -d)"` still finds the pinned host)."""
    here = repo.parent / "shared" / "host"
    if here.is_dir():
        return here
    origin = _local_origin(repo)
    if origin is not None and (origin.parent / "shared" / "host").is_dir():
        return origin.parent / "shared" / "host"
    return here


SHARED_HOST = shared_host_dir(REPO)
CACHE = REPO / ".comfyui"
UPSTREAM = "https://github.com/Comfy-Org/ComfyUI"


def pinned_version() -> tuple[str, str]:
    """(git tag, commit) from tests/comfyui.version: the first two lines that are not comments."""
    lines = [ln.strip() for ln in VERSION_FILE.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    return lines[0], lines[1]


def pinned_paths() -> tuple[Path, Path]:
    """(the archive in ../shared/host, the folder it extracts to in the cache)."""
    version = pinned_version()[0].lstrip("v")
    return SHARED_HOST / f"ComfyUI-{version}.tar.gz", CACHE / f"ComfyUI-{version}"


def _is_comfyui(path: Path) -> bool:
    return (path / "comfy" / "model_patcher.py").is_file() and (path / "execution.py").is_file()


def extract_pinned() -> Optional[Path]:
    """The pinned host, extracted on first use (into a temporary folder, then renamed: never half a tree)."""
    archive, target = pinned_paths()
    if _is_comfyui(target):
        return target
    if not archive.is_file():
        return None
    CACHE.mkdir(exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="extracting-", dir=CACHE))
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        roots = [p for p in tmp.iterdir() if _is_comfyui(p)]
        if len(roots) != 1:
            raise RuntimeError(f"{archive} does not hold one ComfyUI folder (found {sorted(p.name for p in tmp.iterdir())})")
        if target.exists():  # an incomplete earlier extraction
            shutil.rmtree(target)
        roots[0].rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def find_comfyui() -> Optional[Path]:
    env = os.environ.get("COMFYUI_PATH")
    if env:
        p = Path(env).expanduser().resolve()
        return p if _is_comfyui(p) else None
    parent = REPO.parent
    if parent.name == "custom_nodes" and _is_comfyui(parent.parent):
        return parent.parent
    return extract_pinned()


def why_no_host() -> str:
    """One line: why there is no host, and how to get the pinned one."""
    env = os.environ.get("COMFYUI_PATH")
    if env:
        return f"COMFYUI_PATH={env} is not a ComfyUI checkout (no comfy/model_patcher.py and execution.py)"
    tag = pinned_version()[0]
    archive, _ = pinned_paths()
    return (f"no ComfyUI host ({archive} not found): host tests skipped; get the pinned one with "
            f"`git clone --depth 1 --branch {tag} {UPSTREAM} ComfyUI` and set COMFYUI_PATH=$PWD/ComfyUI")


def add_shims_if_needed() -> None:
    """Use the import-only torchvision/torchaudio stand-ins only where the real packages are absent."""
    missing = [m for m in ("torchvision", "torchaudio") if importlib.util.find_spec(m) is None]
    if missing and str(SHIMS) not in sys.path:
        sys.path.append(str(SHIMS))
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(SHIMS)]))


class Host:
    """A booted ComfyUI in this process: its modules, a base directory and an executor helper."""

    def __init__(self, root: Path, base: Path):
        self.root = root
        self.base = base
        import execution
        import folder_paths
        import nodes

        self.nodes = nodes
        self.execution = execution
        self.folder_paths = folder_paths
        self.events: list[tuple[str, dict]] = []
        self._executor = None

    def pack_module(self, name: str):
        """A module of the AnyDressing pack as ComfyUI imported it (e.g. 'nodes.encode')."""
        pack = os.path.join(str(self.base / "custom_nodes"), PACK_LINK_NAME).replace(".", "_x_")
        return sys.modules[f"{pack}.{name}"]

    @property
    def models_dir(self) -> Path:
        return self.base / "models"

    def anydressing_dir(self) -> Path:
        p = self.models_dir / "anydressing"
        p.mkdir(parents=True, exist_ok=True)
        return p

    # a minimal stand-in for PromptServer: the executor only calls these
    class _Server:
        def __init__(self, events):
            self.client_id = "anydressing-tests"
            self.last_node_id = None
            self.last_prompt_id = None
            self.sockets_metadata = {}
            self._events = events

        def send_sync(self, event, data, sid=None):
            self._events.append((event, data))

        def queue_updated(self):
            pass

    def executor(self, fresh: bool = False):
        if self._executor is None or fresh:
            self._executor = self.execution.PromptExecutor(self._Server(self.events),
                                                           cache_type=self.execution.CacheType.CLASSIC)
        return self._executor

    def run(self, prompt: dict, fresh: bool = False) -> dict:
        """Validate and execute an API-format prompt; returns {'executed': [...], 'cached': [...], 'error': ...}."""
        import uuid

        pid = str(uuid.uuid4())
        valid = asyncio.run(self.execution.validate_prompt(pid, prompt, None))
        if not valid[0]:
            raise AssertionError(f"prompt invalid: {valid[1]} {valid[3]}")
        ex = self.executor(fresh)
        start = len(self.events)
        ex.execute(prompt, pid, {"client_id": "anydressing-tests"}, valid[2])
        events = self.events[start:]
        cached = [n for e, d in events if e == "execution_cached" for n in d.get("nodes", [])]
        executed = [d.get("node") for e, d in events if e == "executing" and d.get("node") is not None]
        errors = [d for e, d in events if e == "execution_error"]
        return {"success": ex.success, "executed": executed, "cached": cached, "errors": errors,
                "outputs": ex.history_result.get("outputs", {}) if ex.history_result else {}}


_HOST: Optional[Host] = None


def boot() -> Host:
    """Boot ComfyUI in this process (once): --cpu before comfy.model_management is imported, then load packs."""
    global _HOST
    if _HOST is not None:
        return _HOST
    root = find_comfyui()
    if root is None:
        raise RuntimeError(why_no_host())
    add_shims_if_needed()
    base = Path(tempfile.mkdtemp(prefix="anydressing-host-"))
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / PACK_LINK_NAME).symlink_to(REPO, target_is_directory=True)
    (base / "custom_nodes" / "anydressing_test_fixtures").symlink_to(FIXTURE_PACK, target_is_directory=True)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    saved = sys.argv
    sys.argv = ["main.py", "--cpu", "--use-pytorch-cross-attention", "--base-directory", str(base),
                "--database-url", "sqlite:///:memory:"]
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        import comfy.cli_args  # noqa: F401  (parses our argv now)
    finally:
        sys.argv = saved
    import utils.extra_config  # noqa: F401  (ComfyUI's own utils package, before nodes shadows it)
    import folder_paths
    import nodes

    assert os.path.samefile(folder_paths.base_path, base), folder_paths.base_path
    import logging

    records: list[logging.LogRecord] = []

    class _Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    keep = _Keep(level=logging.WARNING)
    logging.getLogger().addHandler(keep)
    try:
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
    finally:
        logging.getLogger().removeHandler(keep)
    _HOST = Host(root, base)
    _HOST.boot_warnings = [r.getMessage() for r in records]
    return _HOST


if __name__ == "__main__":
    # `python tests/host.py --find`: the host path (extracting the pinned one if needed), empty when none;
    # `python tests/host.py --why`: the one line saying why there is none (for tests/run.sh)
    if sys.argv[1:] == ["--why"]:
        print(why_no_host())
    else:
        found = find_comfyui()
        print(found or "")
