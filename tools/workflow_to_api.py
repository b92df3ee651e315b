"""Turn a workflow saved by the editor (UI format) into an API prompt (what POST /prompt and the batch tool take).

    python custom_nodes/ComfyUI-AnyDressing/tools/workflow_to_api.py in.json -o out.json
        # from the ComfyUI folder: starts that ComfyUI (custom nodes included) on a free loopback port, asks it for
        # its node definitions (GET /object_info) and stops it
    python custom_nodes/ComfyUI-AnyDressing/tools/workflow_to_api.py in.json -o out.json --server http://127.0.0.1:8188
        # asks a running ComfyUI instead (starts nothing)

Without -o the prompt goes to stdout. Extra ComfyUI flags go after "--".
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent))
sys.path.append(str(Path(__file__).resolve().parent.parent))  # anydressing_core (appended: ComfyUI's "nodes" wins)

from anydressing_core.workflow_api import WorkflowError, to_api_from_object_info  # noqa: E402
from local_comfy import node_definitions, split_comfy_args  # noqa: E402


def main(argv=None) -> int:
    argv, comfy_args = split_comfy_args(list(sys.argv[1:] if argv is None else argv))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workflow", help="a workflow JSON saved by the editor (UI format)")
    ap.add_argument("-o", "--output", help="where to write the API prompt (default: stdout)")
    ap.add_argument("--server", help="a running ComfyUI's address, e.g. http://127.0.0.1:8188 (uses /object_info)")
    ap.add_argument("--comfyui", help="the ComfyUI folder (default: the one whose custom_nodes/ holds this pack, "
                                      "else the current folder); not used with --server")
    args = ap.parse_args(argv)
    workflow = json.loads(Path(args.workflow).read_text(encoding="utf-8"))
    if "nodes" not in workflow:
        raise SystemExit(f"{args.workflow} is already an API prompt (no \"nodes\" list); nothing to convert")
    try:
        api = to_api_from_object_info(workflow, node_definitions(args.server, args.comfyui, comfy_args))
    except WorkflowError as e:
        raise SystemExit(f"{args.workflow}: {e}")
    text = json.dumps(api, indent=2)
    if args.output:
        Path(args.output).write_text(text + "\n", encoding="utf-8")
        print(f"wrote {args.output}: {len(api)} nodes", file=sys.stderr)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
