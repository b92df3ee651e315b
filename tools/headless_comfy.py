"""Shared by the command-line tools: find the ComfyUI folder and start ComfyUI without its server."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

PACK = Path(__file__).resolve().parent.parent


def find_root(given: str | None) -> Path:
    """--comfyui, else the ComfyUI whose custom_nodes/ holds this pack (as invoked, symlinks kept), else the cwd."""
    if given:
        root = Path(given)
    else:
        invoked = Path(sys.argv[0]).absolute().parent.parent
        root = next((p.parent.parent for p in (invoked, PACK) if p.parent.name == "custom_nodes"), Path.cwd())
    if not (root / "main.py").is_file() or not (root / "comfy").is_dir():
        raise SystemExit(f"{root} is not a ComfyUI folder; run from the ComfyUI folder or pass --comfyui PATH")
    return root


def boot(root: Path, comfy_args: list[str]):
    """ComfyUI's own start-up (flags, paths, extra_model_paths.yaml, prestartup scripts, custom nodes), no server.
    Returns ComfyUI's `nodes` and `execution` modules."""
    sys.path.insert(0, str(root))
    saved = sys.argv
    sys.argv = ["main.py"] + comfy_args
    try:
        import main  # noqa: F401  (ComfyUI's main.py: parses the flags and applies the paths; starts no server)
    finally:
        sys.argv = saved
    import execution
    import nodes

    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
    return nodes, execution


def split_comfy_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """Our arguments, and ComfyUI's (everything after "--")."""
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []
