"""The help pages' input and output tables (web/docs/<NodeId>.md), made from the nodes' own schema so they cannot
drift from it: a test compares every page with what this makes.

    python custom_nodes/ComfyUI-AnyDressing/tools/help_pages.py
        # from the ComfyUI folder: starts that ComfyUI on a free loopback port, reads /object_info, rewrites the
        # tables of every page, stops it
    python custom_nodes/ComfyUI-AnyDressing/tools/help_pages.py --server http://127.0.0.1:8188   # a running one

Only the part between the two markers is rewritten; the purpose, the typical settings and the errors are prose.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent))

from local_comfy import node_definitions, split_comfy_args  # noqa: E402

DOCS = Path(__file__).resolve().parent.parent / "web" / "docs"
BEGIN = "<!-- inputs and outputs: made from the node's schema by tools/help_pages.py; do not edit by hand -->"
END = "<!-- end of the generated tables -->"
# combos whose choices are the files on the user's machine: described, not listed
FILE_CHOICES = {
    ("AnyDressingLoadGarmentsNet", "garments_net_name"): "`training-free`, or a file in `models/anydressing/`",
    ("AnyDressingLoadGarmentsNet", "extra_weights_name"): "`none`, or a file in `models/anydressing/` that holds "
                                                          "only Dressing-Attention weights",
}


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ").strip()


def _number(v) -> str:
    if isinstance(v, float) and v.is_integer() and abs(v) < 1e15:
        return f"{v:.1f}"
    return f"{v:,}".replace(",", " ") if isinstance(v, int) and abs(v) >= 100_000 else str(v)


def _input_row(node_id: str, name: str, spec: list, required: bool) -> str:
    kind = spec[0]
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    choices = list(kind) if isinstance(kind, list) else opts.get("options")
    if choices is not None:
        type_name = "choice"
        default = opts.get("default", choices[0] if choices else "")
        allowed = FILE_CHOICES.get((node_id, name)) or ", ".join(f"`{c}`" for c in choices)
    else:
        type_name = str(kind)
        default = opts.get("default", "")
        if kind in ("INT", "FLOAT") and "min" in opts:
            allowed = f"{_number(opts['min'])} to {_number(opts.get('max'))}"
            if "step" in opts:
                allowed += f", step {_number(opts['step'])}"
        elif kind == "STRING":
            allowed = "text, several lines" if opts.get("multiline") else "text"
        else:
            allowed = "a link"
    if isinstance(default, float):
        default = _number(default)
    default = f"`{default}`" if default != "" else ("empty" if kind == "STRING" else "")
    return (f"| `{name}` | {type_name} | {'yes' if required else 'no'} | {default} | {_cell(allowed)} | "
            f"{_cell(opts.get('tooltip', ''))} |")


def tables(node_id: str, info: dict) -> str:
    """The generated block of one page, from the node's /object_info entry."""
    lines = [BEGIN, "## Inputs", "", "| Input | Type | Required | Default | Range or choices | What it does |",
             "|---|---|---|---|---|---|"]
    inputs = info.get("input", {})
    order = info.get("input_order") or {k: list(v) for k, v in inputs.items()}
    for section in ("required", "optional"):
        for name in order.get(section, []):
            lines.append(_input_row(node_id, name, inputs[section][name], section == "required"))
    lines += ["", "## Outputs", "", "| Output | Type | What it is |", "|---|---|---|"]
    tips = info.get("output_tooltips") or [""] * len(info.get("output", []))
    for name, kind, tip in zip(info.get("output_name", []), info.get("output", []), tips):
        lines.append(f"| `{name}` | {kind} | {_cell(tip or '')} |")
    lines.append(END)
    return "\n".join(lines)


def with_tables(page: str, node_id: str, info: dict) -> str:
    """The page with its generated block replaced (or put after the first paragraph when it has none)."""
    block = tables(node_id, info)
    if BEGIN in page and END in page:
        head, rest = page.split(BEGIN, 1)
        return head + block + rest.split(END, 1)[1]
    head, _, rest = page.partition("\n\n## ")
    return f"{head}\n\n{block}\n\n## {rest}" if rest else f"{page.rstrip()}\n\n{block}\n"


def main(argv=None) -> int:
    argv, comfy_args = split_comfy_args(list(sys.argv[1:] if argv is None else argv))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--server", help="a running ComfyUI's address (default: start the one this pack is in)")
    ap.add_argument("--comfyui", help="the ComfyUI folder (default: the one whose custom_nodes/ holds this pack)")
    args = ap.parse_args(argv)
    info = node_definitions(args.server, args.comfyui, comfy_args)
    for page in sorted(DOCS.glob("AnyDressing*.md")):
        node_id = page.stem
        if node_id not in info:
            raise SystemExit(f"{node_id} is not a node of that ComfyUI: is the pack installed there?")
        page.write_text(with_tables(page.read_text(encoding="utf-8"), node_id, info[node_id]), encoding="utf-8")
        print(f"wrote {page.name}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
