"""Everything that is not a proxied model request: probes, listings, admin, metrics, status page.

- `/health/live` (supervisor up) and `/health/ready` (at least one model loaded);
- `/v1/models` (OpenAI list: `owned_by` = engine, plus status and aliases; adapters listed with
  `parent`) and `/models` (llama.cpp router's listing, `?reload=1` rescans);
- llama.cpp router's admin routes: `POST /models/load`, `POST /models/unload` with
  `{"model": NAME}` -> `{"success": true}`, plus `GET /running` and `GET /props`;
- `/metrics` in Prometheus text format; `?model=NAME` returns that child's own metrics;
- the control page `/` (`/ui`, served from static/control.html; its routes are in control.py) and
  the status JSON (`/api/status`) and event stream (`/api/events`).
The middleware every request passes (request IDs, keys, CORS, last-resort errors) is in
middleware.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from . import __version__, control, router_api
from .catalog import ModelEntry
from .errors import bad_request, error_response, from_scheduler, not_found_model
from .middleware import on_response_prepare
from .preset_catalog import preset_text
from .router_api import engine_build_info
from .scheduler import Model, SchedulerError
from .units import format_bytes

if TYPE_CHECKING:
    from .app import Runtime

log = logging.getLogger("swapper.api")

STATIC = Path(__file__).with_name("static")


# ------------------------------------------------------------------------------ status shape


def model_status(rt: Runtime, m: Model) -> dict[str, Any]:
    """DESIGN.md's status shape (llama.cpp router's) plus swapper's extras."""
    now = rt.scheduler.clock()
    est = rt.estimate_or_none(m.entry)
    return {
        "value": m.state.public,
        "failed": bool(m.failed),
        "exit_code": m.exit_code,
        "args": list(m.instance.process.argv) if getattr(m.instance, "process", None) else list(m.entry.args),
        "state": m.state.value,
        "inflight": m.inflight,
        "queued": sum(1 for w in m.queue if w.counts),
        "pinned": m.pinned,
        "footprint_bytes": m.measured,
        "reserved_bytes": m.reserved,
        "estimate_bytes": est.bytes if est else None,
        "idle_seconds": round(now - m.last_used, 3) if m.last_used and m.state.public == "loaded" else None,
        "last_used": rt.scheduler.wall() - (now - m.last_used) if m.last_used else None,
        "error": m.error,
        "retry_after": round(max(0.0, m.backoff_until - now), 3) if m.failed else None,
        **({"preset": preset} if (preset := preset_text(m.entry)) else {}),
    }


def model_json(rt: Runtime, m: Model, created: int) -> dict[str, Any]:
    e = m.entry
    return {
        "id": e.id, "object": "model", "owned_by": e.engine, "created": created,
        "aliases": list(e.aliases), "tags": [], "status": model_status(rt, m),
        "source": e.source, "path": str(e.path) if e.path else e.repo, "size_bytes": e.size,
        "adapters": [a.name for a in e.adapters], "can_remove": e.source == "cache",
        "architecture": {"input_modalities": ["text", "image"] if e.mmproj else ["text"],
                         "output_modalities": ["text"]},
        "devices": rt.scheduler.placement_of(m),  # device id -> bytes it holds there
    }


def device_json(d: dict[str, Any]) -> dict[str, Any]:
    """One planned device in the status document: its own budget, ledger, reading and models."""
    r = d["reading"]
    return {"id": d["id"], "name": d["name"], "uuid": d["uuid"], "capacity_bytes": d["capacity"],
            "ledger_bytes": d["ledger"], "probe": {"total": r.total, "used": r.used, "free": r.free} if r else None,
            "models": d["models"]}


def adapter_json(rt: Runtime, m: Model, name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "owned_by": m.entry.engine, "created": created,
            "parent": m.entry.id, "aliases": [], "status": model_status(rt, m)}


# ------------------------------------------------------------------------------ handlers


class Api:
    def __init__(self, rt: Runtime):
        self.rt = rt

    def routes(self, app: web.Application) -> None:
        app.on_response_prepare.append(on_response_prepare)
        r = app.router
        r.add_get("/health/live", self.live)
        r.add_get("/health/ready", self.ready)
        r.add_get("/health", self.health)
        r.add_get("/v1/health", self.health)
        r.add_get("/v1/models", self.v1_models)
        r.add_get("/models", self.router_models)
        r.add_post("/models/load", self.load)
        r.add_post("/models/unload", self.unload)
        r.add_get("/running", self.running)
        r.add_get("/props", self.props)
        r.add_get("/metrics", self.metrics)
        r.add_get("/", self.page)
        r.add_get("/ui", self.page)
        r.add_get("/api/status", self.status)
        r.add_get("/api/events", self.events)
        control.Control(self.rt).register(app)  # the control page's events, logs and pin/unpin

        router_api.RouterApi(self.rt).routes(app)

    # --------------------------------------------------------------------- probes

    async def live(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "version": __version__})

    async def health(self, request: web.Request) -> web.Response:
        """llama.cpp router's `/health`: 200 while requests are accepted (a model or not)."""
        if self.rt.closing:
            return web.json_response({"status": "unavailable", "reason": "shutting down"}, status=503)
        return web.json_response({"status": "ok"})

    async def ready(self, request: web.Request) -> web.Response:
        s = self.rt.scheduler
        loaded = [m.id for m in s.loaded()]
        if self.rt.closing:
            return web.json_response({"status": "unavailable", "reason": "shutting down"}, status=503)
        if loaded:
            return web.json_response({"status": "ok", "loaded": loaded})
        loading = [m.id for m in s.models.values() if m.state.public == "loading"]
        reason = "no model is loaded yet" + (f" (loading: {', '.join(loading)})" if loading else "")
        return web.json_response({"status": "unavailable", "reason": reason, "loading": loading}, status=503)

    # --------------------------------------------------------------------- listings

    def _models(self) -> list[Model]:
        """Listed models (a cache model hidden by a preset's dedup-cache-models is served, not listed)."""
        s = self.rt.scheduler
        return [s.models[e.id] for e in self.rt.catalog if e.id in s.models and not e.hidden]

    async def v1_models(self, request: web.Request) -> web.Response:
        created = int(self.rt.started_wall)
        data: list[dict[str, Any]] = []
        for m in self._models():
            data.append(model_json(self.rt, m, created))
            data += [adapter_json(self.rt, m, a.name, created) for a in m.entry.adapters]
        return web.json_response({"object": "list", "data": data})

    async def router_models(self, request: web.Request) -> web.Response:
        if request.query.get("reload"):
            err = await self.rt.reload()
            if err is not None:
                status, message = err
                return error_response(f"reload failed, previous settings kept: {message}", status,
                                      "invalid_request" if status == 400 else "internal_error")
        created = int(self.rt.started_wall)
        return web.json_response({"object": "list", "data": [model_json(self.rt, m, created) for m in self._models()]})

    async def running(self, request: web.Request) -> web.Response:
        out = []
        for m in self._models():
            if not m.loaded:
                continue
            st = model_status(self.rt, m)
            out.append({"id": m.id, "engine": m.entry.engine, "state": m.state.value,
                        "footprint_bytes": m.measured or m.reserved, "idle_seconds": st["idle_seconds"],
                        "inflight": m.inflight, "pinned": m.pinned,
                        "url": m.instance.base_url if m.instance else None})
        return web.json_response({"object": "list", "data": out})

    async def props(self, request: web.Request) -> web.StreamResponse:
        name = request.query.get("model")
        if name:
            return await self.rt.proxy.handle_get(request, name)
        s = self.rt.scheduler
        return web.json_response({
            "role": "router", "build_info": await engine_build_info(self.rt), "max_instances": s.cfg.max_models,
            "models_autoload": self.rt.settings.models_autoload, "model_alias": "swapper", "model_path": "none",
            "swapper_version": __version__,
            "default_generation_settings": {"params": {}, "n_ctx": 0},
            "budget_bytes": s.capacity, "device": f"{s.probe.kind}:{s.probe.index}", "devices": list(s.probes),
        })

    # --------------------------------------------------------------------- admin

    async def _admin_target(self, request: web.Request) -> tuple[dict[str, Any], Model] | web.Response:
        """The JSON body of a load/unload and the model it names (or the error answer)."""
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            return bad_request("request body is not valid JSON")
        except RecursionError:
            return bad_request("request body is nested too deeply")
        if not isinstance(body, dict):
            return bad_request("request body must be a JSON object")
        name = body.get("model")
        if not isinstance(name, str) or not name:
            return bad_request("'model' must be a non-empty string", "model")
        entry = self._lookup(name)
        if isinstance(entry, web.Response):
            return entry
        return body, self.rt.scheduler.models[entry.id]

    def _lookup(self, name: str) -> ModelEntry | web.Response:
        """Names are names: a catalog id, name or alias, never a path on disk."""
        res = self.rt.catalog.resolve(name)
        if res is None:
            return not_found_model(name, self.rt.catalog.names())
        if res.adapter is not None:
            return bad_request(f"'{name}' is an adapter of model '{res.entry.id}': load or unload "
                               f"'{res.entry.id}' (requests naming the adapter load it on demand)", "model")
        return res.entry

    async def load(self, request: web.Request) -> web.Response:
        """llama.cpp's `POST /models/load`: starts the load and answers at once (`?wait=1` blocks).

        A load that does not fit evicts idle models like a request would. Refusals known up
        front (unknown, already running, cannot fit, in back-off) are answered synchronously.
        """
        target = await self._admin_target(request)
        if isinstance(target, web.Response):
            return target
        body, m = target
        entry = m.entry
        wait = _flag(request, "wait")
        s = self.rt.scheduler
        await s.prepare(entry)
        # the scheduler decides (refusals known up front come back at once); no state read here
        fut = s.start_load(entry.id, reason="manual", refuse_loaded=True, refuse_loading=not wait)
        if fut.done() or wait:
            try:
                await asyncio.shield(fut)  # a client that stops waiting does not cancel the load
            except SchedulerError as e:
                return from_scheduler(e)
        else:
            fut.add_done_callback(_log_failure(entry.id))
        return web.json_response({"success": True})

    async def unload(self, request: web.Request) -> web.Response:
        """llama.cpp's `POST /models/unload`: drains in-flight requests, then stops the child."""
        target = await self._admin_target(request)
        if isinstance(target, web.Response):
            return target
        body, m = target
        entry = m.entry
        force = body.get("force") is True
        fut = self.rt.scheduler.start_unload(entry.id, force=force, reason="manual", refuse_if_unloaded=True)
        if fut.done() or _flag(request, "wait"):
            try:
                await asyncio.shield(fut)
            except SchedulerError as e:
                return from_scheduler(e)
        else:
            fut.add_done_callback(_log_failure(entry.id))
        return web.json_response({"success": True})

    # --------------------------------------------------------------------- metrics

    async def metrics(self, request: web.Request) -> web.StreamResponse:
        name = request.query.get("model")
        if name:
            return await self.rt.proxy.child_metrics(request, name)
        body = generate_latest(self.rt.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    # --------------------------------------------------------------------- status page

    def status_json(self) -> dict[str, Any]:
        rt = self.rt
        s = rt.scheduler
        try:
            mem = s.probe.memory()
            probe = {"total": mem.total, "used": mem.used, "free": mem.free}
        except Exception:
            probe = None
        created = int(rt.started_wall)
        return {
            "version": __version__,
            "device": {"kind": s.probe.kind, "index": s.probe.index, "name": s.probe.name},
            "capacity_bytes": s.capacity, "ledger_bytes": s.ledger_used(), "probe": probe,
            "host_capacity_bytes": s.host_capacity, "host_used_bytes": s.host_used(),
            "ready": s.ready,
            "models": [model_json(rt, m, created) for m in self._models()],
            "events": [ev.__dict__ for ev in list(s.events)[-50:]][::-1],
            "capacity_human": format_bytes(s.capacity),
            "devices": [device_json(d) for d in s.device_view()],
        }

    async def status(self, request: web.Request) -> web.Response:
        return web.json_response(self.status_json())

    async def events(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events: the status JSON whenever something the page shows changed.

        Checked 4x a second; ever-changing numbers (idle seconds, probe bytes) alone do not
        trigger a send, but a heartbeat every 5 s keeps them fresh and the connection alive.
        """
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
        await resp.prepare(request)
        last_sig = None
        last_sent = 0.0
        last_rev = -1
        s = self.rt.scheduler
        try:
            while not self.rt.closing:
                now = time.monotonic()
                # nothing is read (probe, files) unless the scheduler's state changed or a
                # heartbeat is due
                if s.revision != last_rev or now - last_sent >= 5.0:
                    last_rev = s.revision
                    doc = self.status_json()
                    sig = _signature(doc)
                    if sig != last_sig or now - last_sent >= 5.0:
                        await resp.write(f"data: {json.dumps(doc, default=str)}\n\n".encode())
                        last_sig, last_sent = sig, now
                await asyncio.sleep(0.25)
        except (ConnectionResetError, ConnectionError):
            pass  # the page went away
        return resp

    async def page(self, request: web.Request) -> web.StreamResponse:
        path = STATIC / "control.html"
        if not path.exists():
            return error_response("the control page is missing from this installation", 404, "not_found")
        return web.FileResponse(path, headers={"Cache-Control": "no-cache"})


def _signature(doc: dict[str, Any]) -> str:
    """What makes a status document worth sending again (not the clock-driven numbers)."""
    models = [{k: v for k, v in m["status"].items() if k not in ("idle_seconds", "last_used")} | {"id": m["id"]}
              for m in doc["models"]]
    return json.dumps([models, doc["ledger_bytes"], doc["ready"], doc["events"][:1]], default=str)


def _flag(request: web.Request, name: str) -> bool:
    """`?wait=1`, `?wait=true` or a bare `?wait` (llama.cpp checks only that a value is there)."""
    value = request.query.get(name)
    return value is not None and value.lower() not in ("0", "false", "no")


def _log_failure(model: str) -> Callable[[asyncio.Future], None]:
    def done(f: asyncio.Future) -> None:
        if f.cancelled():
            return
        e = f.exception()
        if e is not None:
            log.warning("background admin action on %s failed: %s", model, e)

    return done
