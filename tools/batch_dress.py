"""Batch dressing: a workflow run for many garment combinations, through ComfyUI's server API.

    python custom_nodes/ComfyUI-AnyDressing/tools/batch_dress.py \\
        --workflow custom_nodes/ComfyUI-AnyDressing/workflows/anydressing_upper_lower.json \\
        --outfits outfits.csv --out batch1 --checkpoint my_sd15.safetensors   # from the ComfyUI folder

Without --server the command starts one ComfyUI (main.py on a free loopback port, with the ComfyUI flags given after
"--", e.g. -- --lowvram), dresses, and stops it at the end, on Ctrl-C and on any failure. With --server URL (once
per running ComfyUI: one per GPU, or on other machines) it starts nothing and gives each outfit to a server that is
free, at most --queue-depth of ours queued on each, so a slow server gets fewer; an outfit a server that stopped
answering was working on goes to the others.

Outfits come from a CSV (columns: id, upper, lower, dress, shoes, hat, bag, other = garment image paths inside the
CSV's folder, prompt, negative, seed; any subset of the slot columns) or from a folder with one sub-folder per slot
(--garments DIR: every combination of one image per sub-folder, with --prompt and --seeds). Garments are uploaded
(/upload/image) once per server under content-addressed names; images come back through /history and /view and
are saved to ComfyUI's output/<out>/ (--output-dir with --server) with the outfit in the PNG metadata
("anydressing_outfit"). output/<out>/done.jsonl lists every outfit whose images are safely on disk, so a re-run
skips exactly those. --checkpoint, --width/--height, --steps, --cfg, --sampler, --strength, --garments-net and
--garment-size override the workflow's widgets (an error before start-up if it has no such node); without
--checkpoint a missing workflow checkpoint becomes the first one installed, with a line saying so. A workflow
ComfyUI rejects is reported one line per problem (node, input, reason) before anything is dressed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Optional

sys.path.append(str(Path(__file__).resolve().parent))
sys.path.append(str(Path(__file__).resolve().parent.parent))  # anydressing_core (appended: ComfyUI's "nodes" wins)

from anydressing_core.workflow_api import WorkflowError, to_api_from_object_info  # noqa: E402
from batch_outfits import Manifest, Outfit, outfits_from_csv, outfits_from_folder  # noqa: E402
from batch_run import Dresser  # noqa: E402
from batch_workflow import (apply_overrides, check_overrides, parse_size, resolve_checkpoint,  # noqa: E402
                            workflow_node_types)
from comfy_client import ComfyServer, ServerGone, combo_options  # noqa: E402
from local_comfy import LocalComfyUI, find_root, output_dir, split_comfy_args  # noqa: E402

class Interrupts:
    """Ctrl-C: the first stops the run (our prompts are interrupted or taken out of the queue, nothing more is
    recorded); a second exits at once, after killing a ComfyUI this command started."""

    def __init__(self):
        self.count = 0
        self.local: Optional[LocalComfyUI] = None
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self.event: Optional[asyncio.Event] = None

    def install(self) -> None:
        signal.signal(signal.SIGINT, self.on_sigint)
        signal.signal(signal.SIGTERM, self.on_sigterm)

    def on_sigint(self, signum, frame) -> None:
        self.count += 1
        if self.count > 1:
            if self.local is not None:
                self.local.kill_now()
            os._exit(130)
        if self.loop is not None and self.event is not None:
            self.loop.call_soon_threadsafe(self.event.set)
        else:  # before the dressing started (ComfyUI starting, the workflow being read)
            raise KeyboardInterrupt

    def on_sigterm(self, signum, frame) -> None:
        raise SystemExit(143)  # the finally blocks stop a ComfyUI this command started


def check_out(base: Path, out: str) -> Path:
    """output/<out>/, which must stay inside the output folder."""
    folder = (base / out).resolve()
    try:
        folder.relative_to(base.resolve())
    except ValueError:
        raise SystemExit(f"--out {out}: must be a folder inside the output folder {base.resolve()}") from None
    if folder == base.resolve():
        raise SystemExit(f"--out {out}: name a sub-folder of the output folder {base.resolve()}")
    return folder


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--comfyui", default=None,
                    help="the ComfyUI folder (default: the one whose custom_nodes/ holds this pack, else the current "
                         "folder)")
    ap.add_argument("--server", action="append", default=[],
                    help="a running ComfyUI, e.g. http://127.0.0.1:8188 (repeat for several); starts none")
    ap.add_argument("--workflow", required=True, help="a workflow JSON (UI or API format) with Encode Garments")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--outfits", help="CSV of outfits")
    src.add_argument("--garments", help="folder with one sub-folder of images per slot (every combination)")
    ap.add_argument("--prompt", default="", help="prompt for --garments (default: the workflow's)")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds for --garments")
    ap.add_argument("--out", default="anydressing_batch", help="sub-folder of the output folder")
    ap.add_argument("--output-dir", help="the output folder (default: ComfyUI's output folder, else ./output)")
    ap.add_argument("--allow-paths-outside", action="store_true",
                    help="accept CSV garment paths outside the CSV's folder")
    ap.add_argument("--limit", type=int, default=0, help="stop after this many outfits (0: all)")
    ap.add_argument("--queue-depth", type=int, default=2, help="our prompts queued on each server at most")
    ap.add_argument("--cache-size", type=int, default=16,
                    help="node results the local ComfyUI keeps (--cache-lru; garment encodes reused)")
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
    return ap.parse_args(argv)


async def dress(args, urls: list[str], workflow: dict, outfits: list[Outfit], out_dir: Path,
                interrupts: Interrupts) -> int:
    from tqdm import tqdm

    stop = asyncio.Event()
    interrupts.loop, interrupts.event = asyncio.get_running_loop(), stop
    servers = []
    for url in urls:
        server = ComfyServer(url)
        try:
            await server.open()
            servers.append(server)
        except ServerGone as e:
            print(f"{url} does not answer ({e}); dressing without it", file=sys.stderr, flush=True)
    if not servers:
        raise SystemExit(f"no ComfyUI server answers ({', '.join(urls)}): start one, or check the --server address")
    try:
        info = await servers[0].object_info()
        try:
            api = workflow if "nodes" not in workflow else to_api_from_object_info(workflow, info)
        except WorkflowError as e:
            raise SystemExit(f"{args.workflow}: {e}")
        apply_overrides(api, args)
        for s in servers:
            checkpoints = await s.models("checkpoints")
            for line in resolve_checkpoint(api, args.checkpoint, checkpoints):
                print(line if len(servers) == 1 else f"{s.name}: {line}", flush=True)
        manifest = Manifest(out_dir)
        done = manifest.done_ids()
        todo = [o for o in outfits if o.id not in done]
        print(f"{len(outfits)} outfits: {len(outfits) - len(todo)} done, {len(todo)} to do", flush=True)
        if args.limit:
            todo = todo[:args.limit]
        with tqdm(total=len(todo), desc="dressing", unit="outfit", file=sys.stderr) as bar:
            dresser = Dresser(servers, todo, api, out_dir, manifest, args.queue_depth, stop, bar,
                              choices=lambda ct, name: combo_options(info, ct, name))
            await dresser.run()
        finished = len(outfits) - len(todo) + dresser.finished
        if dresser.fatal:
            raise SystemExit(dresser.fatal)
        if interrupts.count:
            print(f"interrupted: {finished} of {len(outfits)} outfits done; run the same command to continue",
                  file=sys.stderr, flush=True)
            return 130
        if dresser.pending or dresser.in_flight:
            raise SystemExit(f"no ComfyUI server left to dress on: {finished} of {len(outfits)} outfits done; "
                             f"run the same command to continue when a server is up")
        print(f"done: {dresser.finished} outfits, Encode Garments ran {dresser.encodes} time(s); images in "
              f"{out_dir}", flush=True)
        if len(urls) > 1:
            print("per server: " + ", ".join(f"{name} {n}" for name, n in dresser.per_server.items()), flush=True)
        return 0
    finally:
        interrupts.loop = interrupts.event = None
        for s in servers:
            await s.close()


def main(argv=None) -> int:
    argv, comfy_args = split_comfy_args(list(sys.argv[1:] if argv is None else argv))
    args = parse_args(argv)
    interrupts = Interrupts()
    interrupts.install()
    if args.outfits:
        outfits = outfits_from_csv(Path(args.outfits), args.allow_paths_outside)
    else:
        outfits = outfits_from_folder(Path(args.garments), args.prompt, [int(s) for s in args.seeds.split(",")])
    workflow = json.loads(Path(args.workflow).read_text(encoding="utf-8"))
    check_overrides(args, workflow_node_types(workflow), Path(args.workflow).name)
    local = None
    if args.server:
        if comfy_args:
            raise SystemExit("ComfyUI flags after '--' are for the ComfyUI this command starts; with --server, give "
                             "them to your servers instead")
        try:
            base = Path(args.output_dir) if args.output_dir else find_root(args.comfyui) / "output"
        except SystemExit:
            base = Path.cwd() / "output"
    else:
        root = find_root(args.comfyui)
        base = Path(args.output_dir) if args.output_dir else output_dir(root, comfy_args)
        flags = list(comfy_args)
        if not any(f.startswith("--cache-") for f in flags):
            flags += ["--cache-lru", str(args.cache_size)]
        local = LocalComfyUI(root, flags)
        interrupts.local = local
    out_dir = check_out(base, args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        urls = args.server or [local.start().url]
        return asyncio.run(dress(args, urls, workflow, outfits, out_dir, interrupts))
    except KeyboardInterrupt:
        print("interrupted before dressing started; run the same command to start again", file=sys.stderr)
        return 130
    except ServerGone as e:
        raise SystemExit(f"the ComfyUI server stopped answering ({e}); run the same command to continue") from None
    finally:
        if local is not None:
            local.stop()  # (a second Ctrl-C while it stops kills it at once and exits)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # all is cleaned up: a Ctrl-C now must not make Python's exit
        # report a kill by SIGINT instead of this command's own exit code


if __name__ == "__main__":
    sys.exit(main())
