"""A client of one ComfyUI server through its HTTP/WebSocket API, the part of ComfyUI that is stable across releases.

POST /prompt, /ws events, /history, /view, /upload/image, /interrupt, /queue, /object_info, /models: nothing here
imports ComfyUI, so the tools run against any ComfyUI, local or on another machine. Async (aiohttp, which ComfyUI
itself requires), so one process drives several servers at once.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

import aiohttp


class ServerGone(Exception):
    """The server stopped answering (refused, reset, timed out): its prompts must be run elsewhere."""


class PromptRejected(Exception):
    """POST /prompt refused the prompt (or queued it with node errors): ComfyUI's error and node_errors."""

    def __init__(self, error: Optional[dict], node_errors: dict):
        super().__init__(str(error or node_errors))
        self.error, self.node_errors = error, node_errors


@dataclass
class PromptRun:
    """What the /ws events said of one of our prompts."""

    prompt_id: str
    executed: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)
    started: bool = False
    outcome: Optional[str] = None  # "success", "error", "interrupted"
    error: dict = field(default_factory=dict)
    done: asyncio.Event = field(default_factory=asyncio.Event)


class ComfyServer:
    """One ComfyUI server: requests with a time limit, and a /ws listener that follows this client's prompts."""

    def __init__(self, url: str, client_id: Optional[str] = None, timeout: float = 60.0):
        self.url = url.rstrip("/")
        self.client_id = client_id or f"anydressing-{uuid.uuid4().hex[:12]}"
        self.timeout = timeout
        self.runs: dict[str, PromptRun] = {}
        self.alive = True
        self._session: Optional[aiohttp.ClientSession] = None
        self._listener: Optional[asyncio.Task] = None
        self.disconnected = asyncio.Event()

    @property
    def name(self) -> str:
        return self.url.split("://", 1)[-1]

    async def open(self) -> None:
        """Connect the /ws listener (the server must answer)."""
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))
        try:
            ws = await self._session.ws_connect(f"{self.url}/ws?clientId={self.client_id}", max_msg_size=0,
                                                heartbeat=30)
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
            await self.close()
            raise ServerGone(f"{self.name}: {type(e).__name__}: {e}") from None
        self._listener = asyncio.create_task(self._listen(ws))

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            try:
                await self._listener
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
            self._listener = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _listen(self, ws) -> None:
        try:
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    self._on_event(json.loads(msg.data))
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError, ValueError):
            pass
        finally:
            self.disconnected.set()

    def _on_event(self, message: dict) -> None:
        kind, data = message.get("type"), message.get("data") or {}
        pid = data.get("prompt_id") if isinstance(data, dict) else None
        if pid is None:
            return
        # (a prompt's events can come before POST /prompt has answered: they are kept for it all the same; only
        # this client's prompts send events with a prompt id to this client)
        run = self.runs.setdefault(pid, PromptRun(pid))
        if kind == "execution_start":
            run.started = True
        elif kind == "executing" and data.get("node") is not None:
            run.started = True
            run.executed.append(str(data["node"]))
        elif kind == "execution_cached":
            run.cached.extend(str(n) for n in data.get("nodes", []))
        elif kind == "execution_error":
            run.outcome, run.error = "error", data
        elif kind == "execution_interrupted":
            run.outcome = "interrupted"
        elif kind == "executing" and data.get("node") is None:  # the worker is done with the prompt
            run.outcome = run.outcome or "success"
            run.done.set()

    # -- requests -------------------------------------------------------------------------------------------------
    async def request(self, method: str, path: str, *, json_body: Any = None, data: Any = None,
                      raw: bool = False, timeout: Optional[float] = None) -> Any:
        if self._session is None or self._session.closed:
            raise ServerGone(f"{self.name}: not connected")
        try:
            async with self._session.request(method, self.url + path, json=json_body, data=data,
                                             timeout=aiohttp.ClientTimeout(total=timeout or self.timeout)) as r:
                body = await r.read()
                if r.status >= 500:
                    raise ServerGone(f"{self.name}: HTTP {r.status} for {path}")
                if raw:
                    if r.status != 200:
                        raise ServerGone(f"{self.name}: HTTP {r.status} for {path}")
                    return body
                parsed = json.loads(body) if body else None
                if r.status >= 400:
                    return _Refusal(r.status, parsed)
                return parsed
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
            raise ServerGone(f"{self.name}: {type(e).__name__}: {e}") from None

    async def get(self, path: str, **kw) -> Any:
        return await self.request("GET", path, **kw)

    async def post(self, path: str, body: Any = None, **kw) -> Any:
        return await self.request("POST", path, json_body=body, **kw)

    async def object_info(self) -> dict:
        return await self.get("/object_info", timeout=max(self.timeout, 120))

    async def models(self, folder: str) -> list[str]:
        found = await self.get(f"/models/{folder}")
        return list(found) if isinstance(found, list) else []

    async def upload_image(self, data: bytes, name: str, subfolder: str) -> str:
        """Put an image into the server's input/<subfolder>/ as `name`; returns the name LoadImage takes."""
        form = aiohttp.FormData()
        form.add_field("image", data, filename=name, content_type="application/octet-stream")
        form.add_field("subfolder", subfolder)
        form.add_field("type", "input")
        form.add_field("overwrite", "true")
        answer = await self.request("POST", "/upload/image", data=form, timeout=max(self.timeout, 120))
        if isinstance(answer, _Refusal) or not isinstance(answer, dict):
            raise ServerGone(f"{self.name}: /upload/image refused {name}: {answer}")
        sub = answer.get("subfolder") or ""
        return f"{sub}/{answer['name']}" if sub else answer["name"]

    async def submit(self, prompt: dict, extra_data: Optional[dict] = None) -> PromptRun:
        """Queue a prompt; raises PromptRejected when ComfyUI's validation finds errors (a queued prompt with node
        errors is taken out of the queue again, since only some of its outputs would run)."""
        body = {"prompt": prompt, "client_id": self.client_id, "extra_data": dict(extra_data or {})}
        answer = await self.post("/prompt", body)
        if isinstance(answer, _Refusal):
            detail = answer.body if isinstance(answer.body, dict) else {}
            raise PromptRejected(detail.get("error"), detail.get("node_errors") or {})
        pid = answer["prompt_id"]
        if answer.get("node_errors"):
            await self.post("/queue", {"delete": [pid]})
            await self.interrupt(pid)
            raise PromptRejected(None, answer["node_errors"])
        run = self.runs.setdefault(pid, PromptRun(pid))
        return run

    async def history(self, prompt_id: str) -> Optional[dict]:
        found = await self.get(f"/history/{prompt_id}")
        return found.get(prompt_id) if isinstance(found, dict) else None

    async def view(self, image: dict) -> bytes:
        from urllib.parse import urlencode

        query = urlencode({"filename": image["filename"], "subfolder": image.get("subfolder", ""),
                           "type": image.get("type", "output")})
        return await self.request("GET", f"/view?{query}", raw=True, timeout=max(self.timeout, 120))

    async def interrupt(self, prompt_id: str) -> None:
        """Interrupt this prompt if it is the one running (ComfyUI checks the id: another client's is untouched)."""
        await self.post("/interrupt", {"prompt_id": prompt_id})

    async def withdraw(self, prompt_ids: list[str]) -> None:
        """Take our prompts out of the queue and interrupt the one of them that runs."""
        if not prompt_ids:
            return
        await self.post("/queue", {"delete": list(prompt_ids)})
        for pid in prompt_ids:
            await self.interrupt(pid)

    async def answers(self) -> bool:
        try:
            await self.get("/queue", timeout=15)
            return True
        except ServerGone:
            return False


@dataclass
class _Refusal:
    status: int
    body: Any


def combo_options(object_info: dict, class_type: str, name: str) -> list:
    """The choices of a combo input as /object_info lists them (old form [[...], {...}], newer ["COMBO", {options}])."""
    spec = (object_info.get(class_type) or {}).get("input") or {}
    s = {**(spec.get("required") or {}), **(spec.get("optional") or {})}.get(name)
    if not s:
        return []
    if isinstance(s[0], list):
        return list(s[0])
    opts = s[1] if len(s) > 1 and isinstance(s[1], dict) else {}
    return list(opts.get("options") or [])
