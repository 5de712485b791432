"""The control page's server side: one event stream of what changed, plus pin/unpin.

Routes (registered from `Api.routes`):
- `GET /api/control/state`: everything the page shows, once (models, memory, recent requests,
  swaps and swapper's log lines);
- `GET /api/control/events`: server-sent events, a `snapshot` first and then only changes:
  `models` (changed rows), `catalog` (the list itself changed), `memory`, `request` (a
  proxied request finished), `swap`, `log` (a swapper log line), `mlog` (a line of a child's
  output);
- `GET /api/control/logs?model=ID`: a model's recent child output and, when its last load
  failed, why;
- `POST /models/pin` `{"model": NAME, "pinned": bool}` (an admin route, like load and unload).

Model state is read for display only (never to decide anything). It is compared against the
last sent rows a few times a second while a page is connected — attribute reads, no I/O —
so 1,000 listed models cost one short pass, and nothing runs when no page is open.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

from . import process
from .activity import Activity, ChildLogs, LogRing
from .errors import bad_request, error_response, from_scheduler
from .scheduler import Model, SchedulerError

if TYPE_CHECKING:
    from .app import Runtime

log = logging.getLogger("swapper.control")

PAGE_ROUTES = {"/api/control/state", "/api/control/events", "/api/control/logs"}
ADMIN_ROUTE = "/models/pin"
TICK = 0.25  # seconds between comparisons while a page is connected
USED_REFRESH = 5.0  # seconds between sends of the probe's drifting used bytes alone
QUEUE_LIMIT = 5000  # events waiting for one slow page before it is cut off (it reconnects)


class Control:
    def __init__(self, rt: Runtime):
        self.rt = rt
        self.subscribers: set[asyncio.Queue] = set()
        self.activity = Activity(self.publish)
        self.child_logs = ChildLogs(self.publish, watched=lambda: bool(self.subscribers))
        self.log_ring: LogRing | None = None
        self._sent: dict[str, tuple] = {}
        self._ids: list[str] = []
        self._memory: str = ""
        self._memory_at = 0.0
        self._watcher: asyncio.Task | None = None

    # ------------------------------------------------------------------ wiring

    def register(self, app: web.Application) -> None:
        r = app.router
        r.add_get("/api/control/state", self.state)
        r.add_get("/api/control/events", self.events)
        r.add_get("/api/control/logs", self.logs)
        r.add_post(ADMIN_ROUTE, self.pin)
        app.on_startup.append(self._start)
        app.on_shutdown.append(self._end_streams)  # before the server waits for open handlers
        app.on_cleanup.append(self._stop)

    async def _start(self, app: web.Application) -> None:
        self.log_ring = LogRing(self.publish, asyncio.get_running_loop())
        logging.getLogger().addHandler(self.log_ring)
        process.line_hooks.append(self.child_logs.add)
        self.rt.proxy.finished.append(self.activity.finished)
        self.rt.scheduler.listeners.append(self._swap)

    async def _end_streams(self, app: web.Application) -> None:
        for q in list(self.subscribers):
            q.put_nowait(None)

    async def _stop(self, app: web.Application) -> None:
        if self.log_ring is not None:
            logging.getLogger().removeHandler(self.log_ring)
        with contextlib.suppress(ValueError):
            process.line_hooks.remove(self.child_logs.add)
        await self._end_streams(app)
        if self._watcher is not None:
            self._watcher.cancel()

    def publish(self, kind: str, payload: Any) -> None:
        for q in list(self.subscribers):
            if q.qsize() >= QUEUE_LIMIT:
                self.subscribers.discard(q)
                q.put_nowait(None)  # too slow: cut it off; the page reconnects and re-reads
            else:
                q.put_nowait((kind, payload))

    def _swap(self, ev: Any) -> None:
        if self.subscribers:
            self.publish("swap", dict(ev.__dict__))

    # ------------------------------------------------------------------ documents

    def _models(self) -> list[Model]:
        s = self.rt.scheduler
        return [s.models[e.id] for e in self.rt.catalog if e.id in s.models]

    def _signature(self, m: Model) -> tuple:
        return (m.state, m.inflight, len(m.queue), m.pinned, m.failed, m.error, m.exit_code, m.measured,
                m.reserved, m.last_used, m.backoff_until)

    def row(self, m: Model, now: float, wall: float) -> dict[str, Any]:
        est = self.rt.estimate_or_none(m.entry)
        e = m.entry
        return {
            "id": m.id, "engine": e.engine, "aliases": list(e.aliases), "value": m.state.public,
            "state": m.state.value, "inflight": m.inflight, "queued": len(m.queue), "pinned": m.pinned,
            "failed": bool(m.failed), "error": m.error, "exit_code": m.exit_code,
            "measured": m.measured, "reserved": m.reserved, "estimate": est.bytes if est else None,
            "size": e.size,
            "last_used": wall - (now - m.last_used) if m.last_used else None,
            "backoff_until": wall + (m.backoff_until - now) if m.failed and m.backoff_until > now else None,
        }

    def memory(self) -> dict[str, Any]:
        s = self.rt.scheduler
        states = {m.id: m.state.public for m in s.models.values()}
        devices = []
        for d in s.device_view():
            try:
                mem = s.probes[d["id"]].memory()
                total, used = mem.total, mem.used
            except Exception:
                total = used = None
            resident = [{"id": mid, "bytes": b, "state": states.get(mid, "loaded")} for mid, b in d["models"].items()]
            devices.append({"name": d["id"], "label": d["name"], "total": total, "used": used,
                            "capacity": d["capacity"], "ledger": d["ledger"], "models": resident})
        sleeping = [{"id": m.id, "bytes": m.host_reserved} for m in s.models.values() if m.state.value == "sleeping"]
        warm: list[dict[str, Any]] = []
        pf = getattr(self.rt.launcher, "prefetcher", None)
        if pf is not None:
            with contextlib.suppress(RuntimeError):  # changed under us by its thread: next tick
                warm = [{"id": k, "bytes": e.size} for k, e in list(pf.warm.items())]
        return {
            "devices": devices,
            "host": {"capacity": s.host_capacity, "used": s.host_used(), "sleeping": sleeping, "warm": warm},
        }

    def snapshot(self) -> dict[str, Any]:
        s = self.rt.scheduler
        now, wall = s.clock(), s.wall()
        models = self._models()
        self._sent = {m.id: self._signature(m) for m in models}
        self._ids = [m.id for m in models]
        return {
            "models": [self.row(m, now, wall) for m in models],
            "memory": self.memory(), "ready": s.ready,
            "requests": [r.to_json() for r in self.activity.recent],
            "swaps": [dict(ev.__dict__) for ev in list(s.events)[-50:]],
            "log": [ln.to_json() for ln in (self.log_ring.lines if self.log_ring else ())],
            "keys": {"api": bool(self.rt.api_keys), "admin": bool(self.rt.settings.admin_keys)},
        }

    def _changes(self) -> None:
        """Publish the rows (and memory) that changed since the last look."""
        s = self.rt.scheduler
        models = self._models()
        ids = [m.id for m in models]
        now, wall = s.clock(), s.wall()
        if ids != self._ids:
            self._ids = ids
            self._sent = {m.id: self._signature(m) for m in models}
            self.publish("catalog", [self.row(m, now, wall) for m in models])
        else:
            changed = []
            for m in models:
                sig = self._signature(m)
                if self._sent.get(m.id) != sig:
                    self._sent[m.id] = sig
                    changed.append(self.row(m, now, wall))
            if changed:
                self.publish("models", {"rows": changed, "ready": s.ready})
        mem = self.memory()
        # what is planned and resident is news at once; the probe's used bytes drift with every
        # process on the box, so they alone refresh the page at most every few seconds
        sig = json.dumps([{**d, "used": None} for d in mem["devices"]] + [mem["host"]], sort_keys=True)
        mono = time.monotonic()
        if sig != self._memory or mono - self._memory_at >= USED_REFRESH:
            self._memory, self._memory_at = sig, mono
            self.publish("memory", mem)

    async def _watch(self) -> None:
        while self.subscribers:
            await asyncio.sleep(TICK)
            try:
                self._changes()
            except Exception:
                log.exception("control page: comparing model state failed")
        self._watcher = None

    # ------------------------------------------------------------------ handlers

    async def state(self, request: web.Request) -> web.Response:
        return web.json_response(self.snapshot(), dumps=_dumps)

    async def events(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
        await resp.prepare(request)
        q: asyncio.Queue = asyncio.Queue()
        snap = self.snapshot()
        self._memory = ""  # the next look sends memory again (cheap), keeping the signature in one place
        self.subscribers.add(q)
        if self._watcher is None:
            self._watcher = asyncio.ensure_future(self._watch())
        try:
            await resp.write(_sse("snapshot", snap))
            while not self.rt.closing:
                try:
                    item = await asyncio.wait_for(q.get(), 15.0)
                except asyncio.TimeoutError:
                    await resp.write(b": ping\n\n")
                    continue
                batch = [item]
                while not q.empty() and len(batch) < 500:
                    batch.append(q.get_nowait())
                if any(b is None for b in batch):
                    break
                await resp.write(b"".join(_sse(kind, payload) for kind, payload in batch))
        except (ConnectionResetError, ConnectionError):
            pass  # the page went away
        finally:
            self.subscribers.discard(q)
        return resp

    async def logs(self, request: web.Request) -> web.Response:
        name = request.query.get("model", "")
        res = self.rt.catalog.resolve(name) if name else None
        if res is None or res.entry.id not in self.rt.scheduler.models:
            return error_response(f"model '{name}' not found", 404, "model_not_found", param="model")
        m = self.rt.scheduler.models[res.entry.id]
        lines = self.child_logs.tail(m.id)
        if not lines and m.instance is not None:  # started before the page's hooks were in place
            lines = list(getattr(getattr(m.instance, "process", None), "tail", ()))
        return web.json_response({"model": m.id, "lines": lines, "failed": bool(m.failed), "error": m.error,
                                  "exit_code": m.exit_code, "load_tail": list(m.log_tail)})

    async def pin(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            return bad_request("request body is not valid JSON")
        if not isinstance(body, dict) or not isinstance(body.get("model"), str) or not body["model"]:
            return bad_request("'model' must be a non-empty string", "model")
        pinned = body.get("pinned", True)
        if not isinstance(pinned, bool):
            return bad_request("'pinned' must be true or false", "pinned")
        res = self.rt.catalog.resolve(body["model"])
        if res is None or res.adapter is not None:
            return error_response(f"model '{body['model']}' not found; known models: "
                                  f"{', '.join(self.rt.catalog.names())}", 404, "model_not_found", param="model")
        try:
            self.rt.scheduler.set_pinned(res.entry.id, pinned)
        except SchedulerError as e:
            return from_scheduler(e)
        log.info("model %s %s", res.entry.id, "pinned" if pinned else "unpinned")
        return web.json_response({"success": True, "pinned": pinned})


def _default(o: Any) -> Any:
    to_json = getattr(o, "to_json", None)
    if to_json is not None:
        return to_json()
    if isinstance(o, tuple) and len(o) == 2:  # a child log line: (model, text)
        return {"model": o[0], "line": o[1]}
    return str(o)


def _dumps(obj: Any) -> str:
    return json.dumps(obj, default=_default)


def _sse(kind: str, payload: Any) -> bytes:
    if isinstance(payload, tuple):
        payload = _default(payload)
    return f"event: {kind}\ndata: {_dumps(payload)}\n\n".encode()
