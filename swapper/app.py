"""Wiring: settings -> objects -> aiohttp app; start-up, reload and graceful shutdown.

Shutdown (SIGTERM/SIGINT): stop accepting model requests (503 `shutting_down`), answer queued
waiters 503, let in-flight requests finish within `drain_timeout`, stop every child, exit 0.
SIGHUP (or `GET /models?reload=1`) re-reads the config file and rescans the models directory.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import dataclasses
import logging
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import aiohttp
from aiohttp import web

from .api import Api
from .front import Front
from .middleware import make_middlewares
from .backends.llamacpp import LLAMA_HTTP_THREADS
from .catalog import Catalog, ModelEntry, build_catalog
from .config import ConfigError, Settings
from .settings_load import load_settings
from .errors import JsonErrorRunner
from .estimate import Estimate, Estimator, FootprintStore
from .device_set import detect_all
from .gpu import MemoryProbe
from .launcher import ProcessLauncher
from .logsetup import flush_logs, setup_logging
from .metrics import Metrics
from .prefetch import Prefetcher
from .process import raise_nofile_limit
from .proxy import AUDIO_PREFIX, MODEL_ROUTES, Proxy
from .ticker import Ticker
from .upstreams import Upstreams
from .scheduler import Launcher, Scheduler, SchedulerConfig, SwapEvent
from .sched.settings import DeviceLimits
from .systemd import notify

log = logging.getLogger("swapper")
CHILD_CONNECTIONS = LLAMA_HTTP_THREADS - 2


def scheduler_config(st: Settings) -> SchedulerConfig:
    return SchedulerConfig(
        budget=st.budget, reserve=st.reserve, host_budget=st.host_budget, max_models=st.max_models,
        queue_size=st.queue.size, queue_timeout=st.queue.timeout, max_wait=st.queue.max_wait,
        idle_ttl=st.idle_ttl, drain_timeout=st.drain_timeout, prefetch=st.prefetch,
        devices={k: DeviceLimits(d.budget, d.reserve) for k, d in st.devices.items()})


def discover(st: Settings) -> Catalog:
    """The catalog for these settings: models dir, Hugging Face cache, INI presets, config entries.
    A preset file that cannot be read raises `ConfigError`."""
    from .hfcache import scan_hf_cache
    from .ini_preset import PresetError, read_presets

    presets = None
    if st.models_preset:
        try:
            presets = read_presets(st.models_preset)
        except (PresetError, ValueError) as e:
            raise ConfigError(f"--models-preset {st.models_preset}", "", str(e)) from None
    return build_catalog(st, scan_hf_cache(), presets)


@dataclass
class Runtime:
    """Every long-lived object of one swapper process."""

    settings: Settings
    catalog: Catalog
    scheduler: Scheduler
    launcher: Any
    probe: MemoryProbe
    estimator: Estimator
    metrics: Metrics
    reload_settings: Callable[[], Settings] | None = None
    closing: bool = False
    started_wall: float = field(default_factory=time.time)
    _session: aiohttp.ClientSession | None = None
    upstreams: Upstreams = field(default_factory=lambda: Upstreams(CHILD_CONNECTIONS))

    def __post_init__(self) -> None:
        self.api_keys = self.settings.all_api_keys()
        self.proxy = Proxy(self)
        self.api = Api(self)

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # for health checks, sleep/wake and scrapes (requests go through `upstreams`); one
            # pooled session for every child; bytes pass through undecoded; idle connections
            # are dropped before llama-server's own 5 s keep-alive timeout closes them under us,
            # and there are never more per child than it has HTTP threads (an idle kept-alive
            # connection holds one of llama-server's threads: more would stall new requests).
            # No cookie jar: a proxy must not carry one client's cookies to another (and
            # filtering a jar costs on every request)
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, limit_per_host=CHILD_CONNECTIONS, ttl_dns_cache=None,
                                               keepalive_timeout=4.0),
                auto_decompress=False, timeout=aiohttp.ClientTimeout(total=None),
                cookie_jar=aiohttp.DummyCookieJar())
        return self._session

    def estimate_or_none(self, entry: ModelEntry) -> Estimate | None:
        try:
            return self.estimator.peek(entry)
        except Exception:
            return None

    async def prepare(self, entry: ModelEntry) -> None:
        """Compute a model's estimate off the event loop (the scheduler's own step; kept here
        for callers that prepare before acquiring)."""
        await self.scheduler.prepare(entry)

    async def reload(self) -> tuple[int, str] | None:
        """Re-read settings (config file) and rescan models; the scheduler adopts the result.

        A reload that fails keeps every previous setting and returns (status, message): 400 for
        a bad config, 500 for anything else (the models directory cannot be read, ...)."""
        st = self.settings
        try:
            if self.reload_settings is not None:
                st = self.reload_settings()
            merged = dataclasses.replace(self.settings, models=st.models, models_dir=st.models_dir,
                                         defaults=st.defaults, preload=st.preload,
                                         models_preset=st.models_preset)
            catalog = await asyncio.get_running_loop().run_in_executor(None, discover, merged)
        except ConfigError as e:
            log.error("reload: %s (keeping the previous settings)", e)
            return 400, str(e)
        except Exception as e:
            log.exception("reload failed (keeping the previous settings)")
            return 500, f"{e.__class__.__name__}: {e}"
        self.settings.models, self.settings.models_dir = st.models, st.models_dir
        self.settings.defaults, self.settings.preload = st.defaults, st.preload
        self.settings.models_preset = st.models_preset
        self.catalog = catalog
        eager = {r.entry.id for r in map(catalog.resolve, self.settings.preload) if r is not None}
        self.scheduler.set_catalog(catalog, eager=eager)
        log.info("reloaded: %d models", len(catalog))
        bus = getattr(self, "router_events", None)  # /models/sse listeners (router_api.py)
        if bus is not None:
            bus.publish("*", "models_reload")
        return None


def build_runtime(st: Settings, probe: MemoryProbe | list[MemoryProbe] | None = None,
                  launcher: Launcher | None = None, reload_settings: Callable[[], Settings] | None = None,
                  clock: Callable[[], float] = time.monotonic) -> Runtime:
    probes = list(probe) if isinstance(probe, (list, tuple)) else [probe] if probe else detect_all(st.device)
    probe = probes[0]
    catalog = discover(st)
    estimator = Estimator(FootprintStore(st.state_path / "footprints.json"), probe.kind)
    metrics = Metrics()
    holder: dict[str, Runtime] = {}
    if launcher is None:
        host_total = probe.memory().total if probe.kind == "host" else _host_total()
        prefetcher = Prefetcher(st.host_budget.resolve(host_total), enabled=st.prefetch)
        launcher = ProcessLauncher(st, probes, lambda: holder["rt"].session, prefetcher)
    sched = Scheduler(catalog, probes, launcher, estimator, scheduler_config(st), clock=clock)
    rt = Runtime(st, catalog, sched, launcher, probe, estimator, metrics, reload_settings)
    holder["rt"] = rt
    metrics.known = sched.models.__contains__  # the scheduler's own dict (never replaced)
    metrics.attach(sched)
    sched.listeners.append(_log_swap)
    return rt


def _host_total() -> int:
    import psutil

    return int(psutil.virtual_memory().total)


def _log_swap(ev: SwapEvent) -> None:
    """Every swap logged once, with model, reason, bytes and seconds."""
    level = logging.WARNING if ev.action in ("fail", "exit") else logging.INFO
    log.log(level, "swap %s model=%s reason=%s bytes=%d seconds=%.3f%s", ev.action, ev.model, ev.reason,
            ev.bytes, ev.seconds, f" detail={ev.detail.splitlines()[0]!r}" if ev.detail else "",
            extra={"swap": {"action": ev.action, "model": ev.model, "reason": ev.reason,
                            "bytes": ev.bytes, "seconds": round(ev.seconds, 3)}})


def create_app(rt: Runtime) -> web.Application:
    app = web.Application(middlewares=make_middlewares(rt), client_max_size=rt.settings.max_body + 1)
    app["rt"] = rt
    rt.api.routes(app)
    for path in MODEL_ROUTES:
        app.router.add_post(path, rt.proxy.handle)
    app.router.add_post(AUDIO_PREFIX + "{tail:.*}", rt.proxy.handle)
    for path in ("/slots", "/lora-adapters"):
        app.router.add_get(path, _get_with_model(rt))
    app.on_startup.append(_on_startup)
    app.on_cleanup.append(_on_cleanup)
    return app


def _get_with_model(rt: Runtime) -> Callable[[web.Request], Any]:
    async def handler(request: web.Request) -> web.StreamResponse:
        from .errors import bad_request

        name = request.query.get("model")
        if not name:
            return bad_request("add ?model=NAME: this route belongs to one model", "model")
        return await rt.proxy.handle_get(request, name)

    return handler


async def _ticker(rt: Runtime) -> None:
    ticker = Ticker(rt.scheduler.tick, flush_logs)
    rt.scheduler.on_busy = ticker.poke
    await ticker.run()


async def _on_startup(app: web.Application) -> None:
    rt: Runtime = app["rt"]
    app["ticker"] = asyncio.create_task(_ticker(rt), name="ticker")
    names = list(dict.fromkeys(rt.settings.preload + [e.id for e in rt.catalog if e.pinned or e.startup]))
    for name in names:
        res = rt.catalog.resolve(name)
        if res is None:
            log.error("preload: unknown model %r (known: %s)", name, ", ".join(rt.catalog.names()))
            continue
        t = asyncio.ensure_future(_preload(rt, res.entry))
        t.add_done_callback(lambda f, n=name: f.cancelled() or (f.exception() and log.error(
            "preload of %s failed: %s", n, f.exception())))


async def _preload(rt: Runtime, entry: ModelEntry) -> None:
    await rt.prepare(entry)
    await rt.scheduler.load(entry.id, reason="preload")


async def _on_cleanup(app: web.Application) -> None:
    rt: Runtime = app["rt"]
    await shutdown(rt)
    t = app.get("ticker")
    if t is not None:
        t.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await t
    rt.upstreams.close()
    if rt._session is not None:
        await rt._session.close()


async def shutdown(rt: Runtime) -> None:
    if rt.closing and rt.scheduler.closing:
        await rt.scheduler.settle()
        return
    rt.closing = True
    await rt.scheduler.shutdown(rt.settings.drain_timeout)
    pf = getattr(rt.launcher, "prefetcher", None)
    if pf is not None:
        pf.close()


# ------------------------------------------------------------------------------ serve


async def serve_async(st: Settings, reload_settings: Callable[[], Settings] | None = None) -> int:
    rt = build_runtime(st, reload_settings=reload_settings)
    problem = capacity_problem(rt)
    if problem:
        log.error("%s", problem)
        return 2
    atexit.register(getattr(rt.launcher, "kill_all", lambda: None))
    try:
        runner, front = await start_server(rt, st.listen.host, st.listen.port)
    except OSError as e:
        log.error("cannot listen on %s:%s: %s", st.listen.host, st.listen.port, e.strerror or e)
        return 1
    per_device = "" if len(rt.scheduler.probes) == 1 else " over " + ", ".join(
        f"{d['id']} {_fmt(d['capacity'])}" for d in rt.scheduler.device_view())
    log.info("swapper listening on http://%s:%d with %d models (device %s:%d %s, budget %s%s)",
             st.listen.host, st.listen.port, len(rt.catalog), rt.probe.kind, rt.probe.index, rt.probe.name,
             _fmt(rt.scheduler.capacity), per_device)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(rt.reload()))
    notify("READY=1", f"STATUS=serving {len(rt.catalog)} models")
    await stop.wait()
    log.info("shutting down: draining in-flight requests (up to %gs)", st.drain_timeout)
    notify("STOPPING=1")
    await shutdown(rt)
    await stop_server(runner, front)
    log.info("stopped")
    return 0


async def start_server(rt: Runtime, host: str, port: int) -> tuple[web.AppRunner, Front]:
    """The app, and swapper's port: proxied requests served by front.py, everything else by
    aiohttp (the connections front.py hands over)."""
    runner = JsonErrorRunner(create_app(rt), handler_cancellation=True, access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    front = Front(rt, runner.server, rt.proxy.handle)
    try:
        await front.start(host, port)
    except BaseException:
        await runner.cleanup()
        raise
    return runner, front


async def stop_server(runner: web.AppRunner, front: Front) -> None:
    await front.close(5.0)
    await runner.cleanup()


def capacity_problem(rt: Runtime) -> str | None:
    """A budget that can hold nothing is a configuration error, said in one line at start."""
    from .units import format_bytes

    s = rt.scheduler
    where = (f"budget {rt.settings.budget} of {format_bytes(s.core.total)} with reserve "
             f"{format_bytes(rt.settings.reserve)}")
    if s.capacity <= 0:
        return f"cannot serve: {where} leaves a capacity of 0 bytes; raise --budget or lower --reserve"
    sizes = []
    for e in rt.catalog:  # stops at the first model that fits: a big catalog costs one estimate
        est = rt.estimate_or_none(e)
        if est is None:
            with contextlib.suppress(Exception):
                est = rt.estimator.estimate(e)
        if est is not None:
            if est.bytes <= s.capacity:
                return None
            sizes.append(est.bytes)
    if sizes:
        return (f"cannot serve: {where} gives a capacity of {format_bytes(s.capacity)}, smaller than every "
                f"model (the smallest needs {format_bytes(min(sizes))}); raise --budget or lower --reserve")
    return None


def _fmt(n: int) -> str:
    from .units import format_bytes

    return format_bytes(n)


def serve(st: Settings, reload_settings: Callable[[], Settings] | None = None) -> int:
    setup_logging(st.log_level, st.log_format)
    raise_nofile_limit()
    return _run(serve_async(st, reload_settings))


def _run(coro: Any) -> int:
    """uvloop where it is installed (it roughly halves the proxy's CPU per request), else asyncio."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def settings_loader(ns: Any) -> Callable[[], Settings]:
    return lambda: load_settings(ns)
