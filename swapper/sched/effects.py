"""The effects runner: carries out what the decision core asks and reports back as events.

Effects become tasks that call the launcher (start, stop, sleep, wake), results for the
futures requests wait on (grant, fail, done), footprints learned and swap events reported.
Outcomes return to the core as events, queued so the core is never re-entered. This is also
the one place the probe is read for decisions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from ..catalog import Adapter, ModelEntry
from ..estimate import Estimator
from ..gpu import MemoryProbe
from . import events as E
from .core import Core
from .errors import LoadError
from .ledger import Reading
from .lifecycle import Instance, Model

log = logging.getLogger("swapper.scheduler")


class Launcher(Protocol):
    """The edge that turns decisions into processes."""

    async def start(self, entry: ModelEntry, reserved: int, on_exit: Callable[[int | None], None], *,
                    placement: dict[str, float] | None = None) -> Instance:
        """Start a child with only `placement`'s devices visible (split in its proportions).

        `placement` is passed only on a node with several devices; a launcher for one device
        may leave it out of its signature."""
        ...

    async def stop(self, instance: Instance, entry: ModelEntry) -> None: ...

    def can_sleep(self, entry: ModelEntry) -> bool: ...

    async def sleep(self, instance: Instance, entry: ModelEntry) -> None: ...

    async def wake(self, instance: Instance, entry: ModelEntry) -> None: ...

    def prefetch(self, entry: ModelEntry) -> None: ...


@dataclass
class SwapEvent:
    time: float  # wall clock
    model: str
    action: str  # load | evict | sleep | wake | unload | fail | exit
    reason: str  # demand | manual | preload | budget | ttl | drain | shutdown | reload | removed | crash
    bytes: int = 0
    seconds: float = 0.0
    detail: str = ""


@dataclass
class Lease:
    """A granted request: the child to send it to."""

    model: Model
    instance: Instance
    adapter: Adapter | None = None

    @property
    def entry(self) -> ModelEntry:
        return self.model.entry


class EffectsRunner:
    """The edge half of `Scheduler`."""

    core: Core
    probe: MemoryProbe
    probes: dict[str, MemoryProbe]
    launcher: Launcher
    estimator: Estimator
    clock: Callable[[], float]
    wall: Callable[[], float]
    events: deque[SwapEvent]
    listeners: list[Callable[[SwapEvent], None]]
    grant_listeners: list[Callable[[str, float], None]]
    _futures: dict[int, asyncio.Future]
    _tasks: set[asyncio.Task]
    _starts: set[asyncio.Task]
    _inbox: deque[E.Event]
    _feeding: bool
    _read_at: float
    _busy: Callable[[], None]

    def feed(self, ev: E.Event) -> None:
        """Hand one event to the core and carry out its effects; events that effects raise
        meanwhile are queued and handled in order (the core is never re-entered)."""
        self._inbox.append(ev)
        if self._feeding:
            return
        self._feeding = True
        try:
            while self._inbox:
                for eff in self.core.handle(self._inbox.popleft()):
                    try:
                        self._do(eff)
                    except Exception:
                        log.exception("scheduler effect %r failed", eff)
        finally:
            self._feeding = False

    def _do(self, eff: E.Effect) -> None:
        if isinstance(eff, E.Grant):
            fut = self._futures.pop(eff.waiter, None)
            if fut is None or fut.done():
                if eff.counts:
                    self.feed(E.Released(eff.model))  # nobody there to take the slot
                return
            fut.set_result(eff.instance)
            if eff.counts:
                for fn in self.grant_listeners:
                    fn(eff.model, eff.waited)
        elif isinstance(eff, E.Fail):
            fut = self._futures.pop(eff.waiter, None)
            if fut is not None and not fut.done():
                fut.set_exception(eff.error)
        elif isinstance(eff, E.Done):
            fut = self._futures.pop(eff.waiter, None)
            if fut is not None and not fut.done():
                fut.set_result(None)
        elif isinstance(eff, E.Start):
            self._busy()
            self._spawn(self._start(eff), start=True)
        elif isinstance(eff, E.Stop):
            self._busy()
            self._spawn(self._stop(eff))
        elif isinstance(eff, E.Wake):
            self._busy()
            self._spawn(self._wake(eff), start=True)
        elif isinstance(eff, E.Measure):
            self.feed(E.Measured(eff.model, eff.instance, self._process_bytes(eff.instance)))
        elif isinstance(eff, E.Learn):
            self.estimator.learn(eff.entry, eff.bytes)
        elif isinstance(eff, E.Prefetch):
            self.launcher.prefetch(eff.entry)
        elif isinstance(eff, E.Report):
            self._report(eff)
        elif isinstance(eff, E.CancelStarts):
            for t in list(self._starts):
                t.cancel()

    async def _start(self, eff: E.Start) -> None:
        t0 = self.clock()
        child: dict[str, Instance] = {}

        def on_exit(code: int | None) -> None:
            self.feed(E.Exited(eff.model, child.get("instance"), code))  # type: ignore[arg-type]

        devs = list(eff.placement) or list(self.probes)[:1]
        before = self._device_used(devs) if eff.measure_device else None
        try:
            # the placement only matters where there is a choice: single-device launchers keep
            # the three-argument start
            kw = {"placement": eff.placement} if len(self.probes) > 1 and eff.placement else {}
            inst = await self.launcher.start(eff.entry, eff.reserved, on_exit, **kw)
        except asyncio.CancelledError:
            self.feed(E.LoadFailedEvent(eff.model, LoadError("cancelled: swapper is shutting down"), 0.0))
            raise
        except LoadError as e:
            self.feed(E.LoadFailedEvent(eff.model, e, self.clock() - t0))
            return
        except Exception as e:  # a bug in the launcher must not wedge the model
            log.exception("starting %s failed", eff.model)
            self.feed(E.LoadFailedEvent(eff.model, LoadError(str(e)), self.clock() - t0))
            return
        child["instance"] = inst
        readings = self._read()
        after = _used(readings, devs)
        delta = after - before if after is not None and before is not None else None
        per_device = self._per_device(inst)
        total = sum(per_device.values()) if per_device else None
        self.feed(E.Loaded(eff.model, inst, self.clock() - t0, total, delta, readings=readings or None,
                           per_device=per_device if len(eff.placement) > 1 else None))

    async def _stop(self, eff: E.Stop) -> None:
        t0 = self.clock()
        slept = False
        if eff.sleep and eff.instance is not None:
            try:
                await self.launcher.sleep(eff.instance, eff.entry)
                slept = True
            except Exception as e:
                log.warning("sleeping %s failed (%s); stopping it instead", eff.model, e)
        if not slept and eff.instance is not None:
            try:
                await self.launcher.stop(eff.instance, eff.entry)
            except Exception:
                log.exception("stopping %s failed", eff.model)
        self.feed(E.Stopped(eff.model, slept, self.clock() - t0, readings=self._read() or None))

    async def _wake(self, eff: E.Wake) -> None:
        t0 = self.clock()
        try:
            await self.launcher.wake(eff.instance, eff.entry)
        except Exception as e:
            log.error("waking %s failed: %s; stopping it", eff.model, e)
            with contextlib.suppress(Exception):
                await self.launcher.stop(eff.instance, eff.entry)
            self.feed(E.LoadFailedEvent(eff.model, LoadError(f"wake failed: {e}"), self.clock() - t0))
            return
        self.feed(E.Woke(eff.model, self.clock() - t0, self._process_bytes(eff.instance), readings=self._read() or None))

    def _spawn(self, coro: Any, start: bool = False) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        if start:
            self._starts.add(t)
            t.add_done_callback(self._starts.discard)

    def _report(self, r: E.Report) -> None:
        ev = SwapEvent(self.wall(), r.model, r.action, r.reason, r.bytes, r.seconds, r.detail)
        self.events.append(ev)
        for fn in list(self.listeners):
            try:
                fn(ev)
            except Exception:
                log.exception("swap event listener failed")

    # ------------------------------------------------------------------ the probe

    def _read(self) -> dict[str, Reading]:
        """Every planned device's reading (a device whose probe fails is left out)."""
        out: dict[str, Reading] = {}
        for did, probe in self.probes.items():
            try:
                mem = probe.memory()
            except Exception as e:
                log.warning("memory probe of %s failed: %s", did, e)
                continue
            out[did] = Reading(mem.total, mem.used, mem.free)
        self._read_at = time.monotonic()
        return out

    def _refresh(self, min_age: float) -> None:
        if time.monotonic() - self._read_at >= min_age:
            readings = self._read()
            if readings:
                self.feed(E.Tick(readings=readings))

    def _device_used(self, devs: list[str]) -> int | None:
        return _used(self._read(), devs)

    def _per_device(self, inst: Instance) -> dict[str, int]:
        """A child's memory on each device that shows it."""
        out: dict[str, int] = {}
        pids = inst.pids()
        for did, probe in self.probes.items():
            try:
                b = probe.process_bytes(pids)
            except Exception as e:
                log.debug("per-process memory unavailable: %s", e)
                continue
            if b is not None:
                out[did] = b
        return out

    def _process_bytes(self, inst: Instance) -> int | None:
        """A child's memory over every device (None when no driver shows it)."""
        per = self._per_device(inst)
        return sum(per.values()) if per else None

    def _can_sleep(self, entry: ModelEntry) -> bool:
        try:
            return bool(self.launcher.can_sleep(entry))
        except Exception:
            return False

    def _serial_start(self, entry: ModelEntry) -> bool:
        fn = getattr(self.launcher, "serial_start", None)
        try:
            return bool(fn(entry)) if fn is not None else False
        except Exception:
            return False


def _used(readings: dict[str, Reading], devs: list[str]) -> int | None:
    """Used bytes summed over `devs`; None unless every one of them was read."""
    if not devs or any(d not in readings for d in devs):
        return None
    return sum(readings[d].used for d in devs)
