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
import time
from collections import deque
from pathlib import Path
from typing import Optional

sys.path.append(str(Path(__file__).resolve().parent))
sys.path.append(str(Path(__file__).resolve().parent.parent))  # anydressing_core (appended: ComfyUI's "nodes" wins)

from anydressing_core.workflow_api import WorkflowError, to_api_from_object_info  # noqa: E402
from batch_outfits import (Manifest, Outfit, content_name, outfits_from_csv, outfits_from_folder,  # noqa: E402
                           save_atomically)
from batch_workflow import (ENCODE, apply_overrides, check_overrides, parse_size, prepare,  # noqa: E402
                            resolve_checkpoint, result_nodes, validation_lines, workflow_node_types)
from comfy_client import ComfyServer, PromptRejected, ServerGone, combo_options  # noqa: E402
from local_comfy import LocalComfyUI, find_root, output_dir, split_comfy_args  # noqa: E402

UPLOAD_FOLDER = "anydressing_batch"
POLL_SECONDS = 5.0  # /history is read this often for prompts whose /ws events did not come (and as a liveness check)


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


class Dresser:
    """Dresses the outfits over the servers: each keeps at most `depth` of ours queued; a dead server's outfits go
    back to the others."""

    def __init__(self, servers: list[ComfyServer], todo: list[Outfit], api: dict, out_dir: Path,
                 manifest: Manifest, depth: int, stop: asyncio.Event, progress, choices=None):
        self.servers, self.api, self.out_dir, self.manifest = servers, api, out_dir, manifest
        self.choices = choices  # (class_type, input) -> a combo's choices, for validation lines
        self.validated = asyncio.Event()  # the first prompt passed ComfyUI's validation: the others may go
        self.first = asyncio.Lock()
        self.pending = deque(todo)
        self.depth, self.stop, self.progress = max(1, depth), stop, progress
        self.in_flight = 0
        self.changed = asyncio.Condition()
        self.encode_ids = {k for k, v in api.items() if v["class_type"] == ENCODE}
        self.save_ids = result_nodes(api)
        self.finished = 0
        self.encodes = 0
        self.per_server = {s.name: 0 for s in servers}
        self.fatal: Optional[str] = None
        self.started = time.time()

    def take(self, last_set) -> Outfit:
        """The next outfit, preferring one with the garments this server encoded last (its node cache has them)."""
        for i, outfit in enumerate(self.pending):
            if outfit.garment_set() == last_set:
                del self.pending[i]
                return outfit
        return self.pending.popleft()

    async def give_back(self, outfits: list[Outfit]) -> None:
        async with self.changed:
            self.pending.extendleft(reversed(outfits))
            self.in_flight -= len(outfits)
            self.changed.notify_all()

    async def settle(self, n: int = 1) -> None:
        async with self.changed:
            self.in_flight -= n
            self.changed.notify_all()

    def halt(self, message: str) -> None:
        if self.fatal is None:
            self.fatal = message
        self.stop.set()

    async def run(self) -> None:
        waker = asyncio.create_task(self._wake_on_stop())
        try:
            await asyncio.gather(*(self.serve(s) for s in self.servers))
        finally:
            waker.cancel()

    async def _wake_on_stop(self) -> None:
        await self.stop.wait()
        async with self.changed:
            self.changed.notify_all()

    async def serve(self, server: ComfyServer) -> None:
        in_flight: dict[str, tuple] = {}  # prompt id -> (PromptRun, Outfit)
        uploaded: dict[str, str] = {}  # local path -> the name the server's LoadImage takes
        last_set = None
        try:
            while True:
                while len(in_flight) < self.depth and self.pending and not self.stop.is_set():
                    outfit = self.take(last_set)
                    self.in_flight += 1
                    try:
                        run = await self.submit(server, outfit, uploaded)
                    except PromptRejected as e:
                        await self.settle()
                        lines = validation_lines(self.prompt_of(outfit), e.error, e.node_errors, self.choices)
                        self.halt("\n".join([f"outfit {outfit.id}: the workflow does not validate:"] +
                                            [f"  {line}" for line in lines]))
                        break
                    except ServerGone:
                        await self.give_back([outfit])
                        raise
                    in_flight[run.prompt_id] = (run, outfit)
                    last_set = outfit.garment_set()
                if self.stop.is_set():
                    await self.withdraw(server, in_flight)
                    return
                if not in_flight:
                    async with self.changed:
                        if not self.pending and self.in_flight == 0:
                            return
                        await self.changed.wait_for(lambda: self.pending or self.in_flight == 0 or
                                                    self.stop.is_set())
                    continue
                for pid in await self.wait_any(server, in_flight):
                    run, outfit = in_flight.pop(pid)
                    await self.finish(server, run, outfit)
        except ServerGone as e:
            server.alive = False
            outfits = [o for _, o in in_flight.values()]
            await self.give_back(outfits)
            self.say(f"{server.name} stopped answering ({e}); its {len(outfits)} outfit(s) in progress go to the "
                     f"other servers")

    def prompt_of(self, outfit: Outfit) -> dict:
        return prepare(self.api, outfit, {slot: path for slot, path in outfit.garments.items()})

    async def submit(self, server: ComfyServer, outfit: Outfit, uploaded: dict):
        """Upload the outfit's garments (once per server) and queue its prompt. Until one prompt has passed ComfyUI's
        validation, prompts go one at a time: a workflow ComfyUI rejects stops the run before anything is dressed."""
        if self.validated.is_set():
            return await self._submit(server, outfit, uploaded)
        async with self.first:
            run = await self._submit(server, outfit, uploaded)
            self.validated.set()
            return run

    async def _submit(self, server: ComfyServer, outfit: Outfit, uploaded: dict):
        images = {}
        for slot, path in outfit.garments.items():
            if path not in uploaded:
                data = Path(path).read_bytes()
                uploaded[path] = await server.upload_image(data, content_name(Path(path)), UPLOAD_FOLDER)
            images[slot] = uploaded[path]
        extra = {"extra_pnginfo": {"anydressing_outfit": outfit.record()}}
        return await server.submit(prepare(self.api, outfit, images), extra)

    async def wait_any(self, server: ComfyServer, in_flight: dict) -> list[str]:
        """Prompt ids that ended (by /ws, else by /history, read every POLL_SECONDS); [] when the run stops."""
        while not self.stop.is_set():
            ended = [pid for pid, (run, _) in in_flight.items() if run.done.is_set()]
            if ended:
                return ended
            waits = [asyncio.create_task(run.done.wait()) for run, _ in in_flight.values()]
            waits.append(asyncio.create_task(self.stop.wait()))
            lost = asyncio.create_task(server.disconnected.wait()) if not server.disconnected.is_set() else None
            done, rest = await asyncio.wait(waits + [lost] if lost else waits, timeout=POLL_SECONDS,
                                            return_when=asyncio.FIRST_COMPLETED)
            for t in rest:
                t.cancel()
            if not done or lost in done:  # no news, or /ws closed: ask /history (it also tells a dead server)
                for pid, (run, _) in in_flight.items():
                    entry = await server.history(pid)
                    status = (entry or {}).get("status") or {}
                    if status.get("completed") is not None or status.get("status_str") in ("success", "error"):
                        run.outcome = run.outcome or ("success" if status.get("status_str") == "success" else "error")
                        run.done.set()
        return []

    async def finish(self, server: ComfyServer, run, outfit: Outfit) -> None:
        if run.outcome == "interrupted" or self.stop.is_set():
            await self.give_back([outfit])  # interrupted on the server (not by us): dressed again elsewhere or later
            return
        if run.outcome == "error":
            detail = str(run.error.get("exception_message", "")).strip() or "see the ComfyUI log"
            await self.settle()
            self.halt(f"outfit {outfit.id} failed: {detail}")
            return
        entry = await server.history(run.prompt_id) or {}
        outputs = entry.get("outputs") or {}
        images = [img for nid in self.save_ids for img in (outputs.get(nid) or {}).get("images", [])]
        for k, img in enumerate(images, start=1):
            save_atomically(self.out_dir / f"{outfit.id}_{k:05d}_.png", await server.view(img))
        self.manifest.add(outfit)
        executed = run.executed or [n for n in self.api if n not in run.cached]
        self.encodes += sum(1 for n in executed if n in self.encode_ids)
        self.finished += 1
        self.per_server[server.name] += 1
        await self.settle()
        self.tick()

    def tick(self) -> None:
        minutes = max(time.time() - self.started, 1e-6) / 60
        counts = " ".join(f"{name}={n}" for name, n in self.per_server.items())
        self.progress.set_postfix_str(f"{self.finished / minutes:.1f} outfits/min {counts}", refresh=False)
        self.progress.update(1)

    async def withdraw(self, server: ComfyServer, in_flight: dict) -> None:
        """Our queued prompts out of the queue, our running one interrupted; nothing recorded."""
        pids = list(in_flight)
        in_flight.clear()
        try:
            await server.withdraw(pids)
        except ServerGone:
            pass
        await self.settle(len(pids))

    def say(self, line: str) -> None:
        self.progress.write(line, file=sys.stderr)


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
