"""Shared by the command-line tools: find the ComfyUI folder, and run one ComfyUI server as a child process.

The tools talk to ComfyUI only through its server API. With no --server they start ComfyUI's own main.py on a free
loopback port, wait until it answers, and stop it when they end, however they end: normally, on an error, on
Ctrl-C, on SIGTERM. No process is left behind.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Optional

PACK = Path(__file__).resolve().parent.parent
POSIX = os.name == "posix"


def find_root(given: Optional[str]) -> Path:
    """--comfyui, else the ComfyUI whose custom_nodes/ holds this pack (as invoked, symlinks kept), else the cwd."""
    if given:
        root = Path(given)
    else:
        invoked = Path(sys.argv[0]).absolute().parent.parent
        root = next((p.parent.parent for p in (invoked, PACK) if p.parent.name == "custom_nodes"), Path.cwd())
    if not (root / "main.py").is_file() or not (root / "comfy").is_dir():
        raise SystemExit(f"{root} is not a ComfyUI folder; run from the ComfyUI folder or pass --comfyui PATH")
    return root


def node_definitions(server: Optional[str], comfyui: Optional[str], comfy_args: list[str]) -> dict:
    """ComfyUI's node definitions (GET /object_info): of the running --server, else of the ComfyUI folder, started for
    the purpose and stopped again (its log goes to stderr)."""
    if server:
        try:
            return _object_info(server)
        except OSError as e:
            raise SystemExit(f"--server {server}: no answer ({e}); start ComfyUI there or check the address")
    with LocalComfyUI(find_root(comfyui), comfy_args) as local:
        return _object_info(local.url)


def _object_info(url: str) -> dict:
    with urllib.request.urlopen(url.rstrip("/") + "/object_info", timeout=300) as r:
        return json.loads(r.read())


def split_comfy_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """Our arguments, and ComfyUI's (everything after "--")."""
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def flag_value(flags: list[str], name: str) -> Optional[str]:
    """The value of a ComfyUI flag given as `--name value` or `--name=value` (the last one wins)."""
    value = None
    for i, a in enumerate(flags):
        if a == name and i + 1 < len(flags):
            value = flags[i + 1]
        elif a.startswith(name + "="):
            value = a.split("=", 1)[1]
    return value


def output_dir(root: Path, flags: list[str]) -> Path:
    """Where the local ComfyUI writes its output: --output-directory, else <--base-directory or root>/output."""
    given = flag_value(flags, "--output-directory")
    if given:
        return Path(given).resolve()
    base = flag_value(flags, "--base-directory")
    return (Path(base) if base else root).resolve() / "output"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalComfyUI:
    """ComfyUI's main.py as a child process on 127.0.0.1; use as a context manager (stopped on the way out)."""

    def __init__(self, root: Path, flags: list[str], log=None, start_timeout: float = 600):
        self.root, self.flags, self.start_timeout = root, list(flags), start_timeout
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log if log is not None else sys.stderr
        self.proc: Optional[subprocess.Popen] = None

    def command(self) -> list[str]:
        return [sys.executable, "main.py", "--listen", "127.0.0.1", "--port", str(self.port),
                "--disable-auto-launch"] + self.flags

    def start(self) -> "LocalComfyUI":
        # its own session: a Ctrl-C in the terminal reaches the tool, which decides what ComfyUI gets
        group = {"start_new_session": True} if POSIX else {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
        self.proc = subprocess.Popen(self.command(), cwd=self.root, stdout=self.log, stderr=self.log,
                                     stdin=subprocess.DEVNULL, **group)
        deadline = time.time() + self.start_timeout
        while True:
            code = self.proc.poll()
            if code is not None:
                raise SystemExit(f"ComfyUI did not start (main.py exited with {code}); its log is above")
            try:
                with urllib.request.urlopen(self.url + "/queue", timeout=5):
                    return self
            except OSError:
                if time.time() > deadline:
                    self.stop()
                    raise SystemExit(f"ComfyUI did not answer on {self.url} within {self.start_timeout:.0f} s")
                time.sleep(0.2)

    def stop(self, wait: float = 15.0) -> None:
        """SIGTERM, then SIGKILL if it is still there after `wait` seconds; the whole process group either way."""
        proc = self.proc
        if proc is None:
            return
        try:  # (self.proc stays set meanwhile, so that kill_now can still reach it)
            if proc.poll() is None:
                _signal(proc, kill=False)
                try:
                    proc.wait(wait)
                except subprocess.TimeoutExpired:
                    _signal(proc, kill=True)
                    proc.wait(10)
        finally:
            self.proc = None

    def kill_now(self) -> None:
        """For a second Ctrl-C: no waiting."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            _signal(proc, kill=True)

    def __enter__(self) -> "LocalComfyUI":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _signal(proc: subprocess.Popen, kill: bool) -> None:
    """Terminate (or kill) the child and everything it started."""
    try:
        if POSIX:
            os.killpg(proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
        elif kill:
            proc.kill()
        else:
            proc.terminate()
    except ProcessLookupError:
        pass
