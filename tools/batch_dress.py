"""Batch dressing: run a workflow headlessly through ComfyUI's own executor for many garment combinations.

    python custom_nodes/ComfyUI-AnyDressing/tools/batch_dress.py \\
        --workflow custom_nodes/ComfyUI-AnyDressing/workflows/anydressing_upper_lower.json \\
        --outfits outfits.csv --out batch1            # run from the ComfyUI folder, with ComfyUI's Python

Outfits come from a CSV (columns: id, upper, lower, dress, shoes, hat, bag, other = garment image paths, prompt,
negative, seed; any subset of the slot columns) or from a folder with one sub-folder per slot (--garments DIR: every
combination of one image per sub-folder, with --prompt and --seeds). Images go to ComfyUI's output/<out>/ with the
outfit in the PNG metadata ("anydressing_outfit"). Finished outfits are listed in output/<out>/done.jsonl, so a
re-run after an interruption skips them. Garment sets shared by several outfits are encoded once (ComfyUI's LRU
cache). Extra ComfyUI flags go after "--", e.g. -- --lowvram.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import hashlib
import itertools
import json
import os
import shutil
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

SLOTS = ("upper", "lower", "dress", "shoes", "hat", "bag", "other")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class Outfit:
    id: str
    garments: dict[str, str]  # slot -> image path
    prompt: str = ""
    negative: str = ""
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def record(self) -> dict:
        return {"id": self.id, "garments": self.garments, "prompt": self.prompt, "negative": self.negative,
                "seed": self.seed}


def outfits_from_csv(path: Path) -> list[Outfit]:
    out = []
    with open(path, newline="", encoding="utf-8") as f:
        for i, row in enumerate(csv.DictReader(f), start=1):
            garments = {s: row[s].strip() for s in SLOTS if (row.get(s) or "").strip()}
            if not garments:
                raise SystemExit(f"{path}: row {i} names no garment (columns: {', '.join(SLOTS)})")
            base = path.parent
            garments = {s: str((base / p).resolve()) if not os.path.isabs(p) else p for s, p in garments.items()}
            out.append(Outfit(id=(row.get("id") or f"outfit{i:04d}").strip(), garments=garments,
                              prompt=row.get("prompt", "") or "", negative=row.get("negative", "") or "",
                              seed=int(row.get("seed") or 0)))
    return out


def outfits_from_folder(folder: Path, prompt: str, seeds: list[int]) -> list[Outfit]:
    pools = []
    for slot in SLOTS:
        d = folder / slot
        if d.is_dir():
            files = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
            if files:
                pools.append((slot, files))
    if not pools:
        raise SystemExit(f"{folder}: no slot sub-folders with images (expected some of: {', '.join(SLOTS)})")
    out = []
    for combo in itertools.product(*[files for _, files in pools]):
        for seed in seeds:
            garments = {slot: str(p.resolve()) for (slot, _), p in zip(pools, combo)}
            oid = "_".join(p.stem for p in combo) + f"_s{seed}"
            out.append(Outfit(id=oid, garments=garments, prompt=prompt, seed=seed))
    return out


def boot(comfy_args: list[str]):
    """ComfyUI's own start-up (paths, extra_model_paths.yaml, prestartup scripts, custom nodes), no server."""
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


class _Server:
    """What ComfyUI's executor reports to: we count which nodes ran."""

    def __init__(self):
        self.client_id = "anydressing-batch"
        self.last_node_id = None
        self.last_prompt_id = None
        self.sockets_metadata = {}
        self.executed: list[str] = []
        self.sigints: list[int] = [0]

    def send_sync(self, event, data, sid=None):
        if event == "executing" and data.get("node") is not None:
            self.executed.append(data["node"])
            if self.sigints[0]:
                # The executor clears ComfyUI's interrupt flag when a prompt starts, so a Ctrl-C that lands between
                # two prompts would be lost and the next image saved: assert it again before every node.
                import comfy.model_management

                comfy.model_management.interrupt_current_processing(True)

    def queue_updated(self):
        pass


def linked_node(api: dict, ref) -> str:
    return ref[0] if isinstance(ref, list) else None


def prepare(api: dict, outfit: Outfit, input_dir: Path, out_prefix: str) -> dict:
    """The workflow with this outfit's garments, prompts, seed and output name."""
    p = json.loads(json.dumps(api))
    encode_id = next((k for k, v in p.items() if v["class_type"] == "AnyDressingEncodeGarments"), None)
    if encode_id is None:
        raise SystemExit("the workflow has no Encode Garments node")
    enc = p[encode_id]["inputs"]
    for i in range(1, 7):
        enc.pop(f"image_{i}", None)
    stage = input_dir / "anydressing_batch"
    stage.mkdir(parents=True, exist_ok=True)
    for i, slot in enumerate([s for s in SLOTS if s in outfit.garments], start=1):
        src = Path(outfit.garments[slot])
        if not src.is_file():
            raise FileNotFoundError(f"outfit {outfit.id}: {slot} image not found: {src}")
        digest = hashlib.sha256(src.read_bytes()).hexdigest()[:16]
        staged = stage / f"{digest}{src.suffix.lower()}"
        if not staged.exists():
            shutil.copyfile(src, staged)
        nid = f"batch_{slot}"
        p[nid] = {"class_type": "LoadImage", "inputs": {"image": f"anydressing_batch/{staged.name}"}}
        enc[f"image_{i}"] = [nid, 0]
        enc[f"slot_{i}"] = slot
    for node in p.values():
        ct, ins = node["class_type"], node["inputs"]
        if ct in ("KSampler", "KSamplerAdvanced"):
            ins["seed" if "seed" in ins else "noise_seed"] = outfit.seed
            for key, text in (("positive", outfit.prompt), ("negative", outfit.negative)):
                src = linked_node(p, ins.get(key))
                if text and src in p and p[src]["class_type"] == "CLIPTextEncode":
                    p[src]["inputs"]["text"] = text
        if ct == "SaveImage":
            ins["filename_prefix"] = f"{out_prefix}/{outfit.id}"
    return p


def install_interrupt() -> list[int]:
    """First Ctrl-C: ComfyUI's own interrupt, so sampling stops at its next step and the prompt saves nothing (the
    loop then exits without recording it); a second Ctrl-C exits at once. Returns the live count of Ctrl-Cs."""
    import signal

    import comfy.model_management

    count = [0]

    def on_sigint(signum, frame):
        count[0] += 1
        if count[0] > 1:
            os._exit(130)
        comfy.model_management.interrupt_current_processing(True)

    signal.signal(signal.SIGINT, on_sigint)
    return count


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    comfy_args = []
    if "--" in argv:
        comfy_args = argv[argv.index("--") + 1:]
        argv = argv[:argv.index("--")]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--comfyui", default=None,
                    help="the ComfyUI folder (default: the one whose custom_nodes/ holds this pack, else the current "
                         "folder)")
    ap.add_argument("--workflow", required=True, help="a workflow JSON (UI or API format) with Encode Garments")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--outfits", help="CSV of outfits")
    src.add_argument("--garments", help="folder with one sub-folder of images per slot (every combination)")
    ap.add_argument("--prompt", default="", help="prompt for --garments (default: the workflow's)")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds for --garments")
    ap.add_argument("--out", default="anydressing_batch", help="sub-folder of ComfyUI's output folder")
    ap.add_argument("--limit", type=int, default=0, help="stop after this many outfits (0: all)")
    ap.add_argument("--cache-size", type=int, default=16, help="node results ComfyUI keeps (garment encodes reused)")
    args = ap.parse_args(argv)

    if args.outfits:
        outfits = outfits_from_csv(Path(args.outfits))
    else:
        outfits = outfits_from_folder(Path(args.garments), args.prompt, [int(s) for s in args.seeds.split(",")])
    workflow = json.loads(Path(args.workflow).read_text())
    pack = Path(__file__).resolve().parent.parent
    root = Path(args.comfyui) if args.comfyui else (
        pack.parent.parent if pack.parent.name == "custom_nodes" else Path.cwd())
    if not (root / "main.py").is_file() or not (root / "comfy").is_dir():
        raise SystemExit(f"{root} is not a ComfyUI folder; run from ComfyUI or pass --comfyui PATH")
    sys.path.insert(0, str(root))
    nodes, execution = boot(comfy_args)
    import folder_paths
    from tqdm import tqdm

    sys.path.insert(0, str(pack))
    from anydressing_core.workflow_api import to_api

    api = to_api(workflow, nodes.NODE_CLASS_MAPPINGS) if "nodes" in workflow else workflow
    out_dir = Path(folder_paths.get_output_directory()) / args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = out_dir / "done.jsonl"
    done = set()
    if manifest.exists():
        done = {json.loads(line)["id"] for line in manifest.read_text().splitlines() if line.strip()}
    todo = [o for o in outfits if o.id not in done]
    print(f"{len(outfits)} outfits: {len(outfits) - len(todo)} done, {len(todo)} to do", flush=True)
    if args.limit:
        todo = todo[:args.limit]
    server = _Server()
    executor = execution.PromptExecutor(server, cache_type=execution.CacheType.LRU, cache_size=args.cache_size)
    input_dir = Path(folder_paths.get_input_directory())
    encodes = 0
    finished = len(outfits) - len(todo)
    sigints = install_interrupt()
    server.sigints = sigints
    for outfit in tqdm(todo, desc="dressing", unit="outfit"):
        if sigints[0]:
            break
        prompt = prepare(api, outfit, input_dir, args.out)
        pid = str(uuid.uuid4())
        valid = asyncio.run(execution.validate_prompt(pid, prompt, None))
        if not valid[0]:
            raise SystemExit(f"outfit {outfit.id}: the workflow does not validate: {valid[1]} {valid[3]}")
        start = len(server.executed)
        executor.execute(prompt, pid, {"client_id": server.client_id,
                                       "extra_pnginfo": {"anydressing_outfit": outfit.record()}}, valid[2])
        if sigints[0]:  # stopped inside the prompt (nothing saved) or just after it: record nothing either way
            break
        if not executor.success:
            msgs = [m for m in executor.status_messages if m[0] == "execution_error"]
            detail = msgs[-1][1].get("exception_message", "") if msgs else ""
            raise SystemExit(f"outfit {outfit.id} failed: {detail.strip()}")
        encode_ids = {k for k, v in prompt.items() if v["class_type"] == "AnyDressingEncodeGarments"}
        encodes += sum(1 for n in server.executed[start:] if n in encode_ids)
        with open(manifest, "a", encoding="utf-8") as f:
            f.write(json.dumps(outfit.record()) + "\n")
        finished += 1
    if sigints[0]:
        print(f"interrupted: {finished} of {len(outfits)} outfits done; run the same command to continue",
              file=sys.stderr, flush=True)
        return 130
    print(f"done: {len(todo)} outfits, Encode Garments ran {encodes} time(s); images in {out_dir}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
