"""Batch dressing: run a workflow headlessly through ComfyUI's own executor for many garment combinations.

    python custom_nodes/ComfyUI-AnyDressing/tools/batch_dress.py \\
        --workflow custom_nodes/ComfyUI-AnyDressing/workflows/anydressing_upper_lower.json \\
        --outfits outfits.csv --out batch1 --checkpoint my_sd15.safetensors   # from the ComfyUI folder

Outfits come from a CSV (columns: id, upper, lower, dress, shoes, hat, bag, other = garment image paths, prompt,
negative, seed; any subset of the slot columns) or from a folder with one sub-folder per slot (--garments DIR: every
combination of one image per sub-folder, with --prompt and --seeds). Images go to ComfyUI's output/<out>/ with the
outfit in the PNG metadata ("anydressing_outfit"). Finished outfits are listed in output/<out>/done.jsonl, so a
re-run after an interruption skips them. Garment sets shared by several outfits are encoded once (ComfyUI's LRU
cache). --checkpoint, --width/--height, --steps, --cfg, --sampler, --strength, --garments-net and --garment-size
override the workflow's widgets (an error before start-up if it has no such node); without --checkpoint a missing
workflow checkpoint becomes the first one installed, with a line saying so. A workflow ComfyUI rejects is reported
one line per problem (node, input, reason). Extra ComfyUI flags go after "--", e.g. -- --lowvram.
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
from typing import Optional

sys.path.append(str(Path(__file__).resolve().parent))
sys.path.append(str(Path(__file__).resolve().parent.parent))  # anydressing_core (appended: ComfyUI's "nodes" wins)

from anydressing_core.workflow_api import MODE_BYPASSED, MODE_MUTED, WorkflowError, to_api  # noqa: E402
from headless_comfy import boot, find_root, split_comfy_args  # noqa: E402

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


def linked_node(ref) -> Optional[str]:
    """The node id a linked input ([node id, output index]) comes from; None for a widget value."""
    return ref[0] if isinstance(ref, list) else None


# option -> (node types it must find, further node types it also sets, the inputs set on all of them)
OVERRIDES = {
    "checkpoint": (("CheckpointLoaderSimple",), (), ("ckpt_name",)),
    "width": (("EmptyLatentImage",), ("AnyDressingGarmentMasks",), ("width",)),
    "height": (("EmptyLatentImage",), ("AnyDressingGarmentMasks",), ("height",)),
    "steps": (("KSampler", "KSamplerAdvanced"), (), ("steps",)),
    "cfg": (("KSampler", "KSamplerAdvanced"), (), ("cfg",)),
    "sampler": (("KSampler", "KSamplerAdvanced"), (), ("sampler_name",)),
    "strength": (("AnyDressingApplyDressingAttention",), (), ("strength",)),
    "garments_net": (("AnyDressingLoadGarmentsNet",), (), ("garments_net_name",)),
    "garment_size": (("AnyDressingEncodeGarments",), (), ("width", "height")),
}


def workflow_node_types(workflow: dict) -> set[str]:
    """The node types that will run (UI format: muted and bypassed nodes left out; API format: all)."""
    if "nodes" in workflow:
        return {n["type"] for n in workflow["nodes"] if n.get("mode") not in (MODE_MUTED, MODE_BYPASSED)}
    return {n.get("class_type") for n in workflow.values() if isinstance(n, dict)}


def check_overrides(args: argparse.Namespace, types: set[str], workflow_name: str) -> None:
    """Every option given must have a node to set: say which option and which node is missing, before booting."""
    for key, (needed, _, _) in OVERRIDES.items():
        if getattr(args, key) is not None and not types & set(needed):
            option = "--" + key.replace("_", "-")
            raise SystemExit(f"{option}: the workflow {workflow_name} has no {' or '.join(needed)} node to set; "
                             f"drop {option} or use a workflow that has one")
    if "AnyDressingEncodeGarments" not in types:
        raise SystemExit(f"the workflow {workflow_name} has no Encode Garments (AnyDressingEncodeGarments) node")


def parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 576x768, got {text!r}")
    return w, h


def apply_overrides(api: dict, args: argparse.Namespace) -> None:
    """Set the options given on every node they name (the checkpoint is resolved separately)."""
    for key, (needed, also, names) in OVERRIDES.items():
        value = getattr(args, key)
        if value is None or key == "checkpoint":
            continue
        values = value if key == "garment_size" else (value,) * len(names)
        for node in api.values():
            if node["class_type"] in needed + also:
                node["inputs"].update(dict(zip(names, values)))


def resolve_checkpoint(api: dict, wanted: str | None, available: list[str]) -> list[str]:
    """--checkpoint on every CheckpointLoaderSimple; without it, a checkpoint the workflow names but that is not
    installed becomes the first one found. Returns the lines to tell the user."""
    loaders = [n for n in api.values() if n["class_type"] == "CheckpointLoaderSimple"]
    if wanted is not None:
        if wanted not in available:
            raise SystemExit(f"--checkpoint {wanted}: not in ComfyUI's models/checkpoints (found: "
                             f"{', '.join(available) or 'none'})")
        for n in loaders:
            n["inputs"]["ckpt_name"] = wanted
        return []
    said = []
    for n in loaders:
        name = n["inputs"].get("ckpt_name")
        if name in available:
            continue
        if not available:
            raise SystemExit(f"the workflow's checkpoint {name} is not in ComfyUI's models/checkpoints and no other "
                             "checkpoint is there: put an SD1.5 checkpoint there (or pass --checkpoint NAME)")
        n["inputs"]["ckpt_name"] = available[0]
        said.append(f"the workflow's checkpoint {name} is not in models/checkpoints; using {available[0]}, the first "
                    "one found (choose with --checkpoint NAME)")
    return said


def validation_lines(api: dict, error: dict | None, node_errors: dict, choices_of=None) -> list[str]:
    """ComfyUI's validation result as one line per problem: node, input, reason. choices_of(class_type, input)
    gives a combo's choices, so a value not in a long list is answered with the list (ComfyUI only says its length).
    """
    lines = []
    for nid, ne in node_errors.items():
        ct = ne.get("class_type") or api.get(nid, {}).get("class_type")
        title = api.get(nid, {}).get("_meta", {}).get("title") or ct
        label = f"node {nid} ({title})" if title == ct else f"node {nid} ({title}, {ct})"
        for e in ne.get("errors", []):
            extra = e.get("extra_info") or {}
            where = extra.get("input_name")
            if e.get("type") == "value_not_in_list" and choices_of is not None and where:
                options = [str(o) for o in choices_of(ct, where)]
                shown = ", ".join(options[:30]) + (f", ... ({len(options)} in all)" if len(options) > 30 else "")
                reason = f"{extra.get('received_value')!r} is not one of: {shown}"
            else:
                details = str(e.get("details") or "")
                details = details if len(details) <= 400 else details[:400] + "..."
                reason = str(e.get("message")) + (f": {details}" if details else "")
            lines.append(f"{label}, input {where or '-'}: {reason}")
    if not lines and error:
        lines.append(f"{error.get('message')}: {error.get('details')}")
    return lines


def combo_choices(node_classes: dict):
    """choices_of for validation_lines, from the node classes' INPUT_TYPES."""

    def choices_of(class_type: str, name: str) -> list:
        cls = node_classes.get(class_type)
        spec = cls.INPUT_TYPES() if cls is not None else {}
        s = {**(spec.get("required") or {}), **(spec.get("optional") or {})}.get(name)
        if not s:
            return []
        if isinstance(s[0], (list, tuple)):
            return list(s[0])
        opts = s[1] if len(s) > 1 and isinstance(s[1], dict) else {}
        return list(opts.get("options") or [])

    return choices_of


def prepare(api: dict, outfit: Outfit, input_dir: Path, out_prefix: str) -> dict:
    """The workflow with this outfit's garments, prompts, seed and output name.

    The outfit's garments replace the workflow's: its garment loaders (placeholders such as garment_upper.png) are
    removed, and where the workflow took garment masks from its Load Image nodes (the alpha), the staged garments
    give theirs the same way."""
    p = json.loads(json.dumps(api))
    encode_id = next((k for k, v in p.items() if v["class_type"] == "AnyDressingEncodeGarments"), None)
    if encode_id is None:
        raise SystemExit("the workflow has no Encode Garments node")
    enc = p[encode_id]["inputs"]
    replaced = {ref[0] for i in range(1, 7) for ref in (enc.get(f"image_{i}"), enc.get(f"mask_{i}"))
                if isinstance(ref, list)}
    alpha_masks = any(isinstance(enc.get(f"mask_{i}"), list) and enc[f"mask_{i}"][1] == 1 and
                      p.get(enc[f"mask_{i}"][0], {}).get("class_type") == "LoadImage" for i in range(1, 7))
    for i in range(1, 7):
        enc.pop(f"image_{i}", None)
        enc.pop(f"mask_{i}", None)
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
        p[nid] = {"class_type": "LoadImage", "inputs": {"image": f"anydressing_batch/{staged.name}"},
                  "_meta": {"title": f"{slot} garment"}}
        enc[f"image_{i}"] = [nid, 0]
        enc[f"slot_{i}"] = slot
        if alpha_masks:
            enc[f"mask_{i}"] = [nid, 1]
    used = {ref[0] for node in p.values() for ref in node["inputs"].values() if isinstance(ref, list)}
    for nid in replaced - used:  # the workflow's own garment loaders, now unused
        if p.get(nid, {}).get("class_type") == "LoadImage":
            del p[nid]
    for node in p.values():
        ct, ins = node["class_type"], node["inputs"]
        if ct in ("KSampler", "KSamplerAdvanced"):
            ins["seed" if "seed" in ins else "noise_seed"] = outfit.seed
            for key, text in (("positive", outfit.prompt), ("negative", outfit.negative)):
                src = linked_node(ins.get(key))
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
    argv, comfy_args = split_comfy_args(list(sys.argv[1:] if argv is None else argv))
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
    knobs = ap.add_argument_group("overrides of the workflow's widgets (an error if the workflow has no such node)")
    knobs.add_argument("--checkpoint", help="a file in models/checkpoints, for every Load Checkpoint (default: the "
                                            "workflow's, else the first checkpoint found)")
    knobs.add_argument("--width", type=int, help="image width: Empty Latent Image (and Garment Masks)")
    knobs.add_argument("--height", type=int, help="image height: Empty Latent Image (and Garment Masks)")
    knobs.add_argument("--steps", type=int, help="KSampler steps")
    knobs.add_argument("--cfg", type=float, help="KSampler cfg")
    knobs.add_argument("--sampler", help="KSampler sampler_name, e.g. euler, ddim, dpmpp_2m")
    knobs.add_argument("--strength", type=float, help="Apply Dressing-Attention strength")
    knobs.add_argument("--garments-net", help="Load GarmentsNet file in models/anydressing, or training-free")
    knobs.add_argument("--garment-size", type=parse_size, help="Encode Garments width x height, e.g. 576x768")
    args = ap.parse_args(argv)

    if args.outfits:
        outfits = outfits_from_csv(Path(args.outfits))
    else:
        outfits = outfits_from_folder(Path(args.garments), args.prompt, [int(s) for s in args.seeds.split(",")])
    workflow = json.loads(Path(args.workflow).read_text(encoding="utf-8"))
    check_overrides(args, workflow_node_types(workflow), Path(args.workflow).name)
    root = find_root(args.comfyui)
    nodes, execution = boot(root, comfy_args)
    import folder_paths
    from tqdm import tqdm

    try:
        api = workflow if "nodes" not in workflow else to_api(workflow, nodes.NODE_CLASS_MAPPINGS,
                                                              nodes.NODE_DISPLAY_NAME_MAPPINGS)
    except WorkflowError as e:
        raise SystemExit(f"{args.workflow}: {e}")
    apply_overrides(api, args)
    for line in resolve_checkpoint(api, args.checkpoint, folder_paths.get_filename_list("checkpoints")):
        print(line, flush=True)
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
        valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt(pid, prompt, None))
        if not valid or node_errors:  # ComfyUI runs a prompt if any output is valid; a batch needs all of them
            lines = validation_lines(prompt, error, node_errors, combo_choices(nodes.NODE_CLASS_MAPPINGS))
            raise SystemExit("\n".join([f"outfit {outfit.id}: the workflow does not validate:"] +
                                        [f"  {line}" for line in lines]))
        start = len(server.executed)
        executor.execute(prompt, pid, {"client_id": server.client_id,
                                       "extra_pnginfo": {"anydressing_outfit": outfit.record()}}, outputs)
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
