"""`Scheduler`: the object the rest of swapper talks to — commands in, leases out, one view.

Requests and commands become events for the decision core (`core.py`); `effects.py` carries
out what it decides. The probe is read at the edge only: on ticks while something waits or
starts, before a cold request is admitted, and after every start and stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from typing import Callable, Iterable, Sequence

from ..catalog import Adapter, Catalog, ModelEntry
from ..estimate import Estimator
from ..gpu import MemoryProbe, probe_id
from . import events as E
from . import ledger
from .core import Core
from .settings import SchedulerConfig
from .effects import EffectsRunner, Launcher, Lease, SwapEvent
from .errors import ShuttingDown, UnknownModel
from .lifecycle import STARTING, Instance, Model, State

log = logging.getLogger("swapper.scheduler")


class Scheduler(EffectsRunner):
    """One owner of model state: commands in, leases out; decisions in `Core`."""

    def __init__(self, catalog: Catalog, probe: MemoryProbe | Sequence[MemoryProbe], launcher: Launcher,
                 estimator: Estimator, config: SchedulerConfig | None = None,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time):
        self.cfg = config or SchedulerConfig()
        probes = list(probe) if isinstance(probe, (list, tuple)) else [probe]
        self.probes: dict[str, MemoryProbe] = {probe_id(p): p for p in probes}
        self.probe = probes[0]  # the first device (the only one on most nodes)
        self.launcher = launcher
        self.estimator = estimator
        self.clock = clock
        self.wall = wall
        self.events: deque[SwapEvent] = deque(maxlen=200)
        self.listeners: list[Callable[[SwapEvent], None]] = []
        self.grant_listeners: list[Callable[[str, float], None]] = []  # (model, seconds waited)
        self._futures: dict[int, asyncio.Future] = {}
        self._ids = itertools.count(1)
        self._tasks: set[asyncio.Task] = set()
        self._starts: set[asyncio.Task] = set()
        self._inbox: deque[E.Event] = deque()
        self._feeding = False
        self._read_at = float("-inf")
        # told when something time-bound begins (a queued request, a start, a drain), so the
        # ticker watches it at its fast pace
        self.on_busy: Callable[[], None] | None = None
        readings = self._read()
        reading = readings.get(probe_id(self.probe))
        host_total = reading.total if reading and self.probe.kind == "host" else _host_total()
        self.core = Core(self.cfg, clock, reading, host_capacity=self.cfg.host_budget.resolve(host_total),
                         pid_visible=True if self.probe.kind == "host" else None,
                         can_sleep=self._can_sleep, serial_start=self._serial_start,
                         devices=[self._device(p, readings.get(d)) for d, p in self.probes.items()])
        self.catalog = catalog
        self.feed(E.CatalogChanged(list(catalog)))

    def _device(self, p: MemoryProbe, reading: ledger.Reading | None) -> ledger.Device:
        did = probe_id(p)
        limits = self.cfg.devices.get(did)
        budget = limits.budget if limits and limits.budget is not None else self.cfg.budget
        reserve = limits.reserve if limits and limits.reserve is not None else self.cfg.reserve
        return ledger.Device(did, budget, reserve, reading, index=list(self.probes).index(did),
                             uuid=getattr(p, "uuid", None), splittable=not getattr(p, "mig", False))

    # ------------------------------------------------------------------ the read-only view

    @property
    def models(self) -> dict[str, Model]:
        return self.core.models

    @property
    def capacity(self) -> int:
        return self.core.capacity

    @property
    def host_capacity(self) -> int:
        return self.core.host_capacity

    @property
    def closing(self) -> bool:
        return self.core.closing

    @property
    def pid_visible(self) -> bool | None:
        return self.core.pid_visible

    @property
    def revision(self) -> int:
        """Changes whenever a model's state, pin or the catalog changes (not on every request)."""
        return self.core.revision

    @property
    def ready(self) -> bool:
        return any(m.loaded for m in self.models.values())

    def loaded(self) -> list[Model]:
        """The models that serve now: READY or DRAINING (`status.value == "loaded"`)."""
        return [m for m in self.models.values() if m.loaded]

    def ledger_used(self, exclude: Model | None = None) -> int:
        return ledger.used(self.models.values(), exclude)

    def placement_of(self, m: Model) -> dict[str, int]:
        """Bytes `m` holds (or has claimed) on each of its devices; empty when it holds none."""
        if not m.holds_device:
            return {}
        return {d: self.core.share(m, d) for d in self.core.devices_of(m)}

    def device_view(self) -> list[dict]:
        """Per device: capacity, ledger and the models on it (status, metrics, `/models`)."""
        core = self.core
        out = []
        for did, d in core.devices.items():
            on = {m.id: b for m in self.models.values() if (b := self.placement_of(m).get(did))}
            out.append({"id": did, "index": d.index, "uuid": d.uuid, "name": getattr(self.probes.get(did), "name", did),
                        "capacity": d.capacity, "ledger": core.used_on(did), "total": d.total,
                        "reading": d.reading, "models": on})
        return out

    def host_used(self) -> int:
        return ledger.host_used(self.models.values())

    def room(self, exclude: Model | None = None) -> int:
        return self.core.room(exclude)

    def need(self, m: Model) -> int:
        return m.need

    # ------------------------------------------------------------------ requests

    def acquire(self, model_id: str, adapter: Adapter | None = None, *, autoload: bool = True) -> Acquisition:
        """`async with`: wait until the model is resident and hold an in-flight slot on it."""
        return Acquisition(self, model_id, adapter, autoload)

    async def prepare(self, entry: ModelEntry) -> None:
        """Compute a model's estimate off the event loop (reading a big vocabulary takes a while)."""
        m = self.models.get(entry.id)
        if m is not None and m.measured:
            return
        with contextlib.suppress(Exception):
            if self.estimator.peek(entry) is None:
                await asyncio.get_running_loop().run_in_executor(None, self._estimate_entry, entry)

    def start_load(self, model_id: str, reason: str = "manual", *, refuse_loaded: bool = False,
                   refuse_loading: bool = False) -> asyncio.Future:
        """Ask for a model to be resident; the future resolves when it is (refusals at once)."""
        return self._start_load(model_id, reason, refuse_loaded, refuse_loading)[1]

    def _start_load(self, model_id: str, reason: str, refuse_loaded: bool = False,
                    refuse_loading: bool = False) -> tuple[int, asyncio.Future]:
        m = self._model(model_id)
        wid, fut = self._waiter()
        fut.add_done_callback(_retrieve)
        self._arrive(E.Arrived(wid, model_id, self._estimate(m), counts=False, bounded=False, reason=reason,
                               refuse_loaded=refuse_loaded, refuse_loading=refuse_loading,
                               overhead=self._overhead(m)))
        return wid, fut

    async def load(self, model_id: str, reason: str = "manual") -> None:
        """Make a model resident without a request (admin load, preload, pins)."""
        await self.prepare(self._model(model_id).entry)
        wid, fut = self._start_load(model_id, reason)
        try:
            await asyncio.shield(fut)
        except asyncio.CancelledError:
            if not fut.done():
                self.feed(E.Left(wid, model_id))
            raise

    def start_unload(self, model_id: str, force: bool = False, reason: str = "manual", *,
                     refuse_if_unloaded: bool = False) -> asyncio.Future:
        m = self._model(model_id)
        wid, fut = self._waiter()
        self._busy()
        self.feed(E.Unload(wid, m.id, force, reason, refuse_if_unloaded))
        fut.add_done_callback(_retrieve)
        return fut

    async def unload(self, model_id: str, force: bool = False, reason: str = "manual") -> None:
        """Drain in-flight requests, then stop (queued waiters of the model are failed)."""
        await asyncio.shield(self.start_unload(model_id, force, reason))

    def set_pinned(self, model_id: str, pinned: bool) -> None:
        """A pinned model is never evicted (nor TTL-unloaded); unpinned, it is evictable again."""
        self._model(model_id)
        self.feed(E.SetPinned(model_id, pinned))

    def set_catalog(self, catalog: Catalog, eager: Iterable[str] = ()) -> None:
        """Adopt a new catalog (reload): changed resident models restart, removed ones drain."""
        self.catalog = catalog
        self._busy()
        self.feed(E.CatalogChanged(list(catalog), frozenset(eager)))

    async def child_gone(self, instance: Instance, timeout: float = 3.0) -> bool:
        """A granted child refused or reset a connection: wait (briefly) for its exit to be known.

        True once the scheduler knows the child is gone (the request can wait for the reload);
        False if it is still alive (a broken connection, not a dead child)."""
        wait = getattr(instance, "wait_exit", None)
        if wait is None:
            return not getattr(instance, "alive", True)
        return bool(await wait(timeout))

    def _model(self, model_id: str) -> Model:
        if self.closing:
            raise ShuttingDown("swapper is shutting down")
        m = self.core.models.get(model_id)
        if m is None or m.removed:
            raise UnknownModel(f"model '{model_id}' not found; known models: {', '.join(self.catalog.names())}")
        return m

    def _waiter(self) -> tuple[int, asyncio.Future]:
        wid = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._futures[wid] = fut
        return wid, fut

    def _estimate(self, m: Model) -> int:
        if m.measured:
            return m.measured
        try:
            return self.estimator.estimate(m.entry).bytes
        except Exception as e:
            log.warning("cannot estimate %s: %s", m.id, e)
            return m.entry.size

    def _overhead(self, m: Model) -> int:
        """The per-process part of the estimate: paid again on every device of a split."""
        if len(self.probes) == 1:
            return 0
        try:
            return int(self.estimator.estimate(m.entry).overhead)
        except Exception:
            return 0

    def _estimate_entry(self, entry: ModelEntry) -> None:
        try:
            self.estimator.estimate(entry)
        except Exception as e:
            log.warning("cannot estimate %s: %s", entry.id, e)

    def _arrive(self, ev: E.Arrived) -> None:
        m = self.core.models.get(ev.model)
        if m is not None and not m.loaded:  # a cold request decides with a fresh reading
            self._refresh(min_age=0.0)
            self._busy()
        self.feed(ev)

    # ------------------------------------------------------------------ time and shutdown

    def tick(self) -> bool:
        """Time-based rules; the probe is read only while something waits or starts. Whether
        anything time-bound is under way (the ticker's pace)."""
        busy = any(m.queue or m.state in STARTING or m.state == State.AWAITING_ROOM for m in self.models.values())
        readings = self._read() if busy else None
        seen: dict[str, int] = {}
        if busy and self.pid_visible:
            for m in self.models.values():
                if m.state in STARTING and m.instance is not None:
                    seen[m.id] = self._process_bytes(m.instance) or 0
        self.feed(E.Tick(None, seen, readings=readings or None))
        return busy or not self.core.at_rest  # the core's own view after the tick: queues, drains, claims

    def _busy(self) -> None:
        if self.on_busy is not None:
            self.on_busy()

    async def shutdown(self, drain_timeout: float | None = None) -> None:
        """Stop taking work, fail waiters, let in-flight requests finish, stop every child."""
        timeout = self.cfg.drain_timeout if drain_timeout is None else drain_timeout
        self.feed(E.Shutdown(timeout))
        deadline = time.monotonic() + timeout + 1.0
        while any(m.state == State.DRAINING for m in self.models.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            self.tick()
        await self.settle()

    async def settle(self) -> None:
        """Wait until no effect is running (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)



def _retrieve(f: asyncio.Future) -> None:
    """Mark a command's failure as seen: nobody may be awaiting a background load."""
    if not f.cancelled():
        f.exception()


def _host_total() -> int:
    import psutil

    return int(psutil.virtual_memory().total)


class Acquisition:
    """What `Scheduler.acquire` returns: a class rather than a generator-based context manager,
    since every proxied request enters one."""

    __slots__ = ("scheduler", "model_id", "adapter", "autoload")

    def __init__(self, scheduler: Scheduler, model_id: str, adapter: Adapter | None, autoload: bool):
        self.scheduler, self.model_id, self.adapter, self.autoload = scheduler, model_id, adapter, autoload

    async def __aenter__(self) -> Lease:
        s, model_id = self.scheduler, self.model_id
        m = s._model(model_id)
        if not m.measured:
            await s.prepare(m.entry)
        wid, fut = s._waiter()
        s._arrive(E.Arrived(wid, model_id, s._estimate(m), autoload=self.autoload, overhead=s._overhead(m)))
        if not fut.done():  # queued: its queue timeout is watched by the ticker
            s._busy()
        try:
            instance = await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                s.feed(E.Released(model_id))  # granted in the instant the client left
            else:
                s.feed(E.Left(wid, model_id))
            raise
        return Lease(m, instance, self.adapter)

    async def __aexit__(self, *exc: object) -> None:
        self.scheduler.feed(E.Released(self.model_id))
