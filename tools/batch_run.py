"""The dressing loop of the batch command: outfits handed to ComfyUI servers, results saved, faults survived."""

from __future__ import annotations

import asyncio
import sys
import time
from collections import deque
from pathlib import Path
from typing import Optional

from batch_outfits import Manifest, Outfit, content_name, save_atomically
from batch_workflow import ENCODE, prepare, result_nodes, validation_lines
from comfy_client import ComfyServer, PromptRejected, ServerGone

UPLOAD_FOLDER = "anydressing_batch"
POLL_SECONDS = 5.0  # /history is read this often for prompts whose /ws events did not come (and as a liveness check)


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
