"""Find and boot the real ComfyUI host, once per process, for the host tests.

Search order: $COMFYUI_PATH; the ComfyUI whose custom_nodes/ contains this pack; the pinned host that $ANYDRESSING_HOST
names (tests/comfyui.version pins the oldest supported and the newest available; default the oldest), extracted once
from ../shared/host/ComfyUI-<version>.tar.gz (beside this checkout, or beside the checkout a local clone was made from)
into the git-ignored .comfyui/ComfyUI-<version>/.
~/ComfyUI is deliberately not searched: it may be any version, and a green run on an unknown host proves little.
"""

from __future__ import annotations

import asyncio
import atexit
import importlib.util
import json
import os
import shutil
import socket
import sys
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.request
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


def pinned_versions() -> list[tuple[str, str]]:
    """[(git tag, commit)] from tests/comfyui.version, oldest supported first, newest available last."""
    out = []
    for line in VERSION_FILE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            tag, commit = line.split()[:2]
            out.append((tag, commit))
    return out


def selected_tag() -> str:
    """The pinned host this process tests: $ANYDRESSING_HOST (tests/run.sh sets it for each run), else the oldest."""
    tags = [tag for tag, _ in pinned_versions()]
    wanted = os.environ.get("ANYDRESSING_HOST")
    if wanted and wanted not in tags:
        raise RuntimeError(f"ANYDRESSING_HOST={wanted} is not pinned in tests/{VERSION_FILE.name} ({', '.join(tags)})")
    return wanted or tags[0]


def pinned_paths(tag: Optional[str] = None) -> tuple[Path, Path]:
    """(the archive in ../shared/host, the folder it extracts to in the cache) of a pinned tag (default: selected)."""
    version = (tag or selected_tag()).lstrip("v")
    return SHARED_HOST / f"ComfyUI-{version}.tar.gz", CACHE / f"ComfyUI-{version}"


def _is_comfyui(path: Path) -> bool:
    return (path / "comfy" / "model_patcher.py").is_file() and (path / "execution.py").is_file()


def extract_pinned(tag: Optional[str] = None) -> Optional[Path]:
    """A pinned host, extracted on first use (into a temporary folder, then renamed: never half a tree)."""
    archive, target = pinned_paths(tag)
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


def own_comfyui() -> Optional[Path]:
    """A host the user chose: $COMFYUI_PATH (None if it is not a ComfyUI), else the ComfyUI holding this pack."""
    env = os.environ.get("COMFYUI_PATH")
    if env:
        p = Path(env).expanduser().resolve()
        return p if _is_comfyui(p) else None
    parent = REPO.parent
    if parent.name == "custom_nodes" and _is_comfyui(parent.parent):
        return parent.parent
    return None


def find_comfyui() -> Optional[Path]:
    """The host of this process: the user's own (see own_comfyui), else the selected pinned one."""
    if os.environ.get("COMFYUI_PATH"):
        return own_comfyui()
    return own_comfyui() or extract_pinned()


def why_no_host() -> str:
    """One line: why there is no host, and how to get the pinned one."""
    env = os.environ.get("COMFYUI_PATH")
    if env:
        return f"COMFYUI_PATH={env} is not a ComfyUI checkout (no comfy/model_patcher.py and execution.py)"
    tag = selected_tag()
    archive, _ = pinned_paths(tag)
    return (f"no ComfyUI host ({archive} not found): host tests skipped; get the pinned one with "
            f"`git clone --depth 1 --branch {tag} {UPSTREAM} ComfyUI` and set COMFYUI_PATH=$PWD/ComfyUI")


def add_shims_if_needed() -> None:
    """Use the import-only torchvision/torchaudio stand-ins only where the real packages are absent."""
    missing = [m for m in ("torchvision", "torchaudio") if importlib.util.find_spec(m) is None]
    if missing and str(SHIMS) not in sys.path:
        sys.path.append(str(SHIMS))
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(SHIMS)]))


CLIENT_ID = "anydressing-tests"
# the smallest prompt: a mask captured by a fixture node (the first prompt of a boot, and a barrier in reset_cache)
IDLE_PROMPT = {"1": {"class_type": "ADTestBoxMask", "inputs": {"width": 8, "height": 8, "x0": 0.0, "y0": 0.0,
                                                             "x1": 1.0, "y1": 1.0, "value": 1.0}},
               "2": {"class_type": "ADTestCaptureMask", "inputs": {"key": "idle", "mask": ["1", 0]}}}


class Host:
    """ComfyUI booted in this process by its own main.py: the real server on loopback and main.py's prompt worker.

    Tests submit prompts through the server API (POST /prompt), follow them on /ws and read /history, as any client
    does; the executor is the one main.py's worker builds, so the harness never depends on its constructor. The
    fixture nodes' captures (adtest_tiny.STORE) land in this process.
    """

    def __init__(self, root: Path, base: Path, url: str, prompt_server):
        self.root = root
        self.base = base
        self.url = url
        import execution
        import folder_paths
        import nodes

        self.nodes = nodes
        self.execution = execution
        self.folder_paths = folder_paths
        self.prompt_server = prompt_server
        self.events: list[tuple[str, dict]] = []
        self._news = threading.Condition()
        self.boot_warnings: list[str] = []

    def pack_module(self, name: str):
        """A module of the AnyDressing pack as ComfyUI imported it (e.g. 'nodes.encode_garments')."""
        pack = os.path.join(str(self.base / "custom_nodes"), PACK_LINK_NAME).replace(".", "_x_")
        return sys.modules[f"{pack}.{name}"]

    @property
    def models_dir(self) -> Path:
        return self.base / "models"

    def anydressing_dir(self) -> Path:
        p = self.models_dir / "anydressing"
        p.mkdir(parents=True, exist_ok=True)
        return p

    # -- the server API --------------------------------------------------------------------------------------------
    def request(self, path: str, body: Optional[dict] = None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read() or b"null")

    def _listen(self, ready: threading.Event) -> None:
        """Collect every /ws message for our client id (progress, executing, cached, errors) into self.events."""
        import aiohttp

        async def listen():
            async with aiohttp.ClientSession() as session:
                async with session.ws_connect(f"{self.url}/ws?clientId={CLIENT_ID}", max_msg_size=0) as ws:
                    ready.set()
                    async for msg in ws:
                        if msg.type != aiohttp.WSMsgType.TEXT:
                            continue
                        m = json.loads(msg.data)
                        with self._news:
                            self.events.append((m.get("type"), m.get("data") or {}))
                            self._news.notify_all()

        asyncio.run(listen())

    def reset_cache(self) -> None:
        """ComfyUI's 'free model and node cache' (POST /free), as a user clears it: later prompts run on an empty
        node cache with no model loaded. Returns once the worker is done with it (then idle), so that a test may
        touch model management itself."""
        self.request("/free", {"free_memory": True, "unload_models": True})
        queue = self.prompt_server.prompt_queue
        deadline = time.time() + 60
        while queue.get_flags(reset=False) and time.time() < deadline:
            time.sleep(0.01)
        self.run(IDLE_PROMPT)  # queued after the flags were taken: it finishes after the worker acted on them

    def run(self, prompt: dict, fresh: bool = False, timeout: float = 600) -> dict:
        """Submit an API-format prompt and wait until the worker is done with it.

        Returns {'success', 'executed', 'cached', 'errors', 'outputs'} from the /ws events and /history.
        """
        if fresh:
            self.reset_cache()
        with self._news:
            start = len(self.events)
        try:
            pid = self.request("/prompt", {"prompt": prompt, "client_id": CLIENT_ID})["prompt_id"]
        except urllib.error.HTTPError as e:
            body = json.loads(e.read() or b"{}")
            raise AssertionError(f"prompt invalid: {body.get('error')} {body.get('node_errors')}") from None

        def finished() -> bool:
            return any(e == "executing" and d.get("node") is None and d.get("prompt_id") == pid
                       for e, d in self.events[start:])

        deadline = time.time() + timeout
        with self._news:
            while not self._news.wait_for(finished, timeout=1.0):
                if THREAD_ERRORS:
                    raise RuntimeError(f"a ComfyUI thread died: {THREAD_ERRORS[-1]}")
                if time.time() > deadline:
                    raise TimeoutError(f"prompt {pid} did not finish in {timeout} s")
            events = [(e, d) for e, d in self.events[start:] if d.get("prompt_id") in (pid, None)]
        history = self.request(f"/history/{pid}").get(pid, {})
        cached = [n for e, d in events if e == "execution_cached" for n in d.get("nodes", [])]
        executed = [d.get("node") for e, d in events if e == "executing" and d.get("node") is not None]
        errors = [d for e, d in events if e == "execution_error"]
        status = history.get("status", {})
        return {"success": status.get("status_str") == "success", "executed": executed, "cached": cached,
                "errors": errors, "outputs": history.get("outputs", {})}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_HOST: Optional[Host] = None
THREAD_ERRORS: list[str] = []  # uncaught exceptions of ComfyUI's threads (a dead prompt worker fails the run)


def _record_thread_error(args) -> None:
    import traceback

    text = "".join(traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback))
    THREAD_ERRORS.append(f"{args.thread.name if args.thread else '?'}: {text}")
    sys.__stderr__.write(THREAD_ERRORS[-1])



def scratch_dir(prefix: str) -> Path:
    """A fresh folder under the system temp, removed when the process ends (a ComfyUI base directory holds
    checkpoints of hundreds of MB: left behind, a few runs fill a disk). ANYDRESSING_KEEP_TMP=1 keeps them."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    if os.environ.get("ANYDRESSING_KEEP_TMP") != "1":
        atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def boot() -> Host:
    """Boot ComfyUI in this process (once), through its own main.py: flags (--cpu before comfy.model_management is
    imported), paths, custom nodes, the server on a free loopback port and main.py's prompt worker."""
    global _HOST
    if _HOST is not None:
        return _HOST
    root = find_comfyui()
    if root is None:
        raise RuntimeError(why_no_host())
    add_shims_if_needed()
    threading.excepthook = _record_thread_error
    base = scratch_dir("anydressing-host-")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / PACK_LINK_NAME).symlink_to(REPO, target_is_directory=True)
    (base / "custom_nodes" / "anydressing_test_fixtures").symlink_to(FIXTURE_PACK, target_is_directory=True)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    port = _free_port()
    saved = sys.argv, sys.stdout, sys.stderr
    sys.argv = ["main.py", "--cpu", "--use-pytorch-cross-attention", "--base-directory", str(base),
                "--database-url", "sqlite:///:memory:", "--listen", "127.0.0.1", "--port", str(port),
                "--disable-auto-launch", "--disable-api-nodes", "--dont-print-server"]
    import logging

    records: list[logging.LogRecord] = []

    class _Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    keep = _Keep(level=logging.WARNING)
    started: dict = {}
    ready = threading.Event()

    def serve():
        """main.py's start-up and its server loop, in one thread, as main.py runs them (the database it sets up
        belongs to the thread that made it)."""
        try:
            loop, prompt_server, start_all = main.start_comfyui()
            started["server"] = prompt_server
        except BaseException as e:  # noqa: BLE001  (reported by boot)
            started["error"] = e
            return
        finally:
            logging.getLogger().removeHandler(keep)
            ready.set()
        loop.run_until_complete(start_all())

    try:
        spec = importlib.util.spec_from_file_location("comfyui_main", root / "main.py")
        main = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(main)  # ComfyUI's start-up code (not its __main__ block)
        logging.getLogger().addHandler(keep)
        threading.Thread(target=serve, name="comfyui-server", daemon=True).start()
        ready.wait()
    finally:
        sys.argv = saved[0]
        sys.stdout, sys.stderr = saved[1], saved[2]  # ComfyUI's log interceptors stay out of pytest's capture
    if "error" in started:
        raise RuntimeError(f"ComfyUI did not start: {started['error']!r}") from started["error"]
    prompt_server = started["server"]
    import folder_paths

    assert os.path.samefile(folder_paths.base_path, base), folder_paths.base_path

    host = Host(root, base, f"http://127.0.0.1:{port}", prompt_server)
    deadline = time.time() + 120
    while True:
        try:
            host.request("/system_stats")
            break
        except OSError:
            if time.time() > deadline:
                raise RuntimeError(f"ComfyUI's server did not answer on port {port}")
            time.sleep(0.1)
    ready = threading.Event()
    threading.Thread(target=host._listen, args=(ready,), name="comfyui-ws", daemon=True).start()
    if not ready.wait(60):
        raise RuntimeError("ComfyUI's /ws did not accept the test client")
    host.boot_warnings = [r.getMessage() for r in records]
    # One prompt first, as a user's first run: tests also call node functions directly, and ComfyUI's progress hook
    # (which the nodes' progress bars reach) expects the worker to have run a prompt.
    warm = host.run(IDLE_PROMPT)
    if not warm["success"]:
        raise RuntimeError(f"ComfyUI's first prompt failed: {warm['errors']}")
    _HOST = host
    return host


if __name__ == "__main__":
    # For tests/run.sh: `--find`: the host path (extracting the selected pinned one if needed), empty when none;
    # `--why`: the one line saying why there is none; `--pinned`: the pinned tags, one per line, oldest first;
    # `--own`: the user's own host ($COMFYUI_PATH or the ComfyUI holding this pack), empty when none.
    if sys.argv[1:] == ["--why"]:
        print(why_no_host())
    elif sys.argv[1:] == ["--pinned"]:
        print("\n".join(tag for tag, _ in pinned_versions()))
    elif sys.argv[1:] == ["--own"]:
        print(own_comfyui() or "")
    else:
        found = find_comfyui()
        print(found or "")
