"""An in-process swapper for fast HTTP tests: the real app, a fake launcher, fake upstreams.

The launcher "starts" a child by serving a tiny OpenAI-ish aiohttp app on a loopback port of
this process (chat completions as JSON or as an SSE stream, /health). A child can be crashed the
way a killed llama-server goes: its port stops answering at once, and its exit becomes known a
moment later (as when the keeper is reaped), so the proxy's handling of that gap is exercised.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from aiohttp import web
from aiohttp.test_utils import BaseTestServer, TestServer
from yarl import URL

from swapper.app import Runtime, build_runtime, create_app, start_server, stop_server
from swapper.catalog import ModelEntry
from swapper.config import Settings
from swapper.errors import JsonErrorRunner
from swapper.gpu import FakeProbe
from swapper.process import free_port
from swapper.units import SizeSpec

MiB = 1 << 20


class PassBackend:
    """The engine hooks the proxy calls: nothing to rewrite."""

    def rewrite(self, path: str, body: dict[str, Any], entry: ModelEntry, adapter: Any) -> None:
        return None


@dataclass
class FakeChild:
    model: str
    port: int
    runner: web.AppRunner
    on_exit: Callable[[int | None], None]
    backend: PassBackend = field(default_factory=PassBackend)
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    requests: int = 0
    stream_gate: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def pids(self) -> list[int]:
        return []

    def process_alive(self) -> bool:
        return not self.exited.is_set()

    async def wait_exit(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self.exited.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    async def crash(self, known_after: float = 0.05) -> None:
        """Die like a SIGKILLed engine: the port refuses at once, the exit is known a bit later."""
        server = self.runner.server
        for handler in list(server.connections if server else []):
            handler.force_close()  # connections drop at once, mid-response or not
        await self.runner.cleanup()

        def reaped() -> None:
            self.exited.set()
            self.on_exit(137)

        asyncio.get_running_loop().call_later(known_after, reaped)


@dataclass
class FakeLauncher:
    starts: list[str] = field(default_factory=list)
    stops: list[str] = field(default_factory=list)
    children: dict[str, FakeChild] = field(default_factory=dict)

    async def start(self, entry: ModelEntry, reserved: int, on_exit: Callable[[int | None], None], *,
                    placement: dict[str, float] | None = None) -> FakeChild:
        self.starts.append(entry.id)
        child: FakeChild

        async def chat(request: web.Request) -> web.StreamResponse:
            child.requests += 1
            body = await request.json()
            if body.get("stream"):
                resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
                await resp.prepare(request)
                for i in range(int(body.get("max_tokens", 3))):
                    chunk = {"model": entry.id, "choices": [{"delta": {"content": f"t{i} "}}]}
                    await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
                    if i == 0 and body.get("hold"):
                        await child.stream_gate.wait()
                await resp.write(b"data: [DONE]\n\n")
                return resp
            return web.json_response({"model": entry.id, "args": list(entry.args),
                                      "choices": [{"message": {"content": "hi"}}],
                                      "usage": {"prompt_tokens": 3, "completion_tokens": 1}})

        async def health(request: web.Request) -> web.Response:
            return web.json_response({"status": "ok"})

        app = web.Application()
        app.router.add_post("/v1/chat/completions", chat)
        app.router.add_get("/health", health)
        runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=0.1)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        child = FakeChild(entry.id, port, runner, on_exit)
        self.children[entry.id] = child
        return child

    async def stop(self, instance: FakeChild, entry: ModelEntry) -> None:
        self.stops.append(entry.id)
        if not instance.exited.is_set():
            instance.exited.set()
            await instance.runner.cleanup()

    def can_sleep(self, entry: ModelEntry) -> bool:
        return False

    async def sleep(self, instance: FakeChild, entry: ModelEntry) -> None:
        raise NotImplementedError

    async def wake(self, instance: FakeChild, entry: ModelEntry) -> None:
        raise NotImplementedError

    def prefetch(self, entry: ModelEntry) -> None:
        pass


class JsonErrorTestServer(TestServer):
    """aiohttp's test server, with swapper's runner (parser errors in the JSON shape)."""

    async def _make_runner(self, **kwargs: Any) -> web.AppRunner:
        return JsonErrorRunner(self.app, **kwargs)


class OwnFrontTestServer(BaseTestServer):
    """swapper's port as `serve` opens it: front.py for proxied requests, aiohttp behind it."""

    def __init__(self, rt: Runtime, **kwargs: Any):
        super().__init__(**kwargs)
        self.rt = rt
        self.front: Any = None

    async def start_server(self, loop: asyncio.AbstractEventLoop | None = None, **kwargs: Any) -> None:
        if self.runner:
            return
        self.runner, self.front = await start_server(self.rt, self.host, 0)
        self.port = self.front.server.sockets[0].getsockname()[1]
        self.scheme = "http"
        self._root = URL(f"http://{self.host}:{self.port}")

    async def _make_runner(self, **kwargs: Any) -> web.AppRunner:  # pragma: no cover - not used
        raise NotImplementedError

    async def close(self) -> None:
        if self.started and not self.closed:
            await stop_server(self.runner, self.front)  # type: ignore[arg-type]
            self._root = None
            self.port = None
            self._closed = True


def make_models(d: Path, names: tuple[str, ...] = ("a", "b")) -> Path:
    from swapper.synth import write_model

    d.mkdir(parents=True, exist_ok=True)
    for i, n in enumerate(names):
        write_model(d / f"{n}.gguf", 2 * MiB, seed=i, ctx=256)
    return d


def runtime(tmp: Path, budget: int = 1 << 30, reload_settings: Callable[[], Settings] | None = None,
            **kw: Any) -> tuple[Runtime, FakeLauncher]:
    st = Settings(models_dir=str(make_models(tmp / "models")), state_dir=str(tmp / "state"),
                  budget=SizeSpec(bytes=budget), reserve=0, **kw)
    launcher = FakeLauncher()
    rt = build_runtime(st, probe=FakeProbe(total=8 << 30), launcher=launcher, reload_settings=reload_settings)
    return rt, launcher


def app_for(rt: Runtime) -> web.Application:
    return create_app(rt)
