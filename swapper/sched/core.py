"""The decision core: events in, effects out. Synchronous, and it never touches the world.

`Core.handle(event)` updates the models' state and returns the effects the runner must carry
out; the runner reports their outcome back as further events. Probe readings, estimates and
measurements arrive inside events, so the core reads no probe, file or process itself and its
specs need no sleeps. Admission (grants, eviction claims, drains, idle TTL) lives in
`admission.py`; this module handles each event.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable

from ..catalog import ModelEntry
from .admission import Admission
from .devices import Devices
from .errors import (AlreadyLoaded, NotLoaded, Pinned, QueueFull, QueueTimeout,
                     ShuttingDown, UnknownModel, Unloaded)
from .events import (Arrived, CatalogChanged, Done, Effect, Event, Exited, Fail, Learn, Left, Loaded,
                     LoadFailedEvent, Measure, Measured, Released, Report, SetPinned, Shutdown, Stopped,
                     CancelStarts, Tick, Unload, Woke)
from .ledger import Device, Reading
from .lifecycle import SERVING, STARTING, Leaving, Model, Starting, State, Waiter
from .settings import SchedulerConfig

_ON_READY_ONLY = (Arrived, Released)
_PUMPED = (State.DRAINING, State.AWAITING_ROOM)

log = logging.getLogger("swapper.scheduler")


def launch_key(e: ModelEntry) -> ModelEntry:
    """The part of an entry its child starts with: a change here needs a restart."""
    return dataclasses.replace(e, aliases=(), pinned=False, idle_ttl=None)


class Core(Devices, Admission):
    def __init__(self, cfg: SchedulerConfig, clock: Callable[[], float], reading: Reading | None,
                 host_capacity: int = 0, pid_visible: bool | None = None,
                 can_sleep: Callable[[ModelEntry], bool] = lambda e: False,
                 serial_start: Callable[[ModelEntry], bool] = lambda e: False,
                 devices: list[Device] | None = None):
        self.cfg = cfg
        self.clock = clock
        self.devices = {d.id: d for d in devices} if devices else {
            "0": Device("0", cfg.budget, cfg.reserve, reading)}
        self.host_capacity = host_capacity
        self.pid_visible = pid_visible
        self.can_sleep = can_sleep
        self.serial_start = serial_start
        self.models: dict[str, Model] = {}
        self.names: list[str] = []
        self.closing = False
        self.at_rest = False
        self.revision = 0  # bumped by every state change (the status stream's "anything new?")
        self.out: list[Effect] = []
        self._internal = -1  # waiter ids for loads nobody awaits (reload restarts)

    # ------------------------------------------------------------------ dispatch

    def handle(self, ev: Event) -> list[Effect]:
        self.out = []
        handler = getattr(self, "_on_" + type(ev).__name__)
        handler(ev)
        if not (self.at_rest and type(ev) in _ON_READY_ONLY and self._ready_and_unqueued(ev.model)):  # type: ignore[attr-defined]
            self.pump()
            self.at_rest = self._rests()
        out, self.out = self.out, []
        return out

    def _ready_and_unqueued(self, model: str) -> bool:
        m = self.models.get(model)
        return m is not None and m.state == State.READY and not m.queue

    def _rests(self) -> bool:
        """Nothing for `pump` to act on: no queue, no drain, no claim anywhere.

        From rest, a request granted on a ready model, or released from one, leaves nothing for
        `pump` either (a busier model enables no admission, and with nobody waiting a freer one
        has nobody to admit): those events, every proxied request's two, skip it. Time-based
        rules come with ticks, which always pump."""
        if self.closing:
            return False
        return not any(m.queue or m.state in _PUMPED for m in self.models.values())

    def emit(self, eff: Effect) -> None:
        self.out.append(eff)

    def report(self, m: Model, action: str, reason: str, nbytes: int = 0, seconds: float = 0.0,
               detail: str = "") -> None:
        self.emit(Report(m.id, action, reason, int(nbytes or 0), float(seconds), detail))

    # ------------------------------------------------------------------ requests

    def _on_Arrived(self, ev: Arrived) -> None:
        now = self.clock()
        m = self.models.get(ev.model)
        if self.closing:
            return self.emit(Fail(ev.waiter, ShuttingDown("swapper is shutting down")))
        if m is None or m.removed:
            return self.emit(Fail(ev.waiter, UnknownModel(
                f"model '{ev.model}' not found; known models: {', '.join(self.names)}")))
        if not m.measured and ev.estimate:
            m.estimate = ev.estimate
        if ev.overhead:
            m.overhead = ev.overhead
        w = Waiter(ev.waiter, m.id, now, ev.counts)
        if ev.refuse_loaded and m.state == State.READY or ev.refuse_loading and m.state.public == "loading":
            return self.emit(Fail(ev.waiter, AlreadyLoaded(f"model '{m.id}' is already running ({m.state.public})")))
        if m.state == State.READY:
            return self.grant(m, w)
        if not ev.autoload:
            return self.emit(Fail(ev.waiter, NotLoaded("model is not loaded")))
        if not self.fits_ever(m):
            return self.emit(Fail(ev.waiter, self.too_big(m)))
        if m.failed and now < m.backoff_until and m.state == State.UNLOADED:
            return self.emit(Fail(ev.waiter, self.load_failed(m, now)))
        if (not ev.counts and m.state == State.DRAINING and m.pending_entry is None
                and m.stop_reason not in ("shutdown", "removed")):
            self.to(m, State.READY)  # a load command calls off an eviction or unload drain
            return self.grant(m, w)
        if ev.bounded and m.queued >= self.cfg.queue_size:
            return self.emit(Fail(ev.waiter, QueueFull(
                f"queue for model '{m.id}' is full ({self.cfg.queue_size} waiting)",
                retry_after=self.retry_after(m))))
        if not m.queue and m.state == State.UNLOADED:
            m.next_reason = ev.reason
        m.queue.append(w)

    def _on_Left(self, ev: Left) -> None:
        m = self.models.get(ev.model)
        if m is not None:
            m.queue = type(m.queue)(w for w in m.queue if w.id != ev.waiter)

    def _on_Released(self, ev: Released) -> None:
        m = self.models.get(ev.model)
        if m is None:
            return
        m.inflight = max(0, m.inflight - 1)
        m.last_used = self.clock()
        if not m.first_request_measured and m.loaded and m.instance is not None:
            m.first_request_measured = True
            self.emit(Measure(m.id, m.instance))

    # ------------------------------------------------------------------ the runner reports

    def _on_Loaded(self, ev: Loaded) -> None:
        self.take(ev.reading, ev.readings)
        m = self.models.get(ev.model)
        if m is None or m.state != State.LOADING:
            log.error("model %s reported loaded while %s", ev.model, m.state.value if m else "unknown")
            return
        now = self.clock()
        rec = m.rec
        assert isinstance(rec, Starting)
        self.to(m, State.READY)
        m.instance = ev.instance
        m.failed, m.error, m.exit_code = False, None, None
        if not m.after_crash:
            m.failures = 0
        m.load_seconds = ev.seconds
        m.loaded_at = m.last_used = now
        m.first_request_measured = False
        if self.pid_visible is None:
            self.pid_visible = ev.process_bytes is not None
        self.learn(m, ev.process_bytes if ev.process_bytes is not None else ev.device_delta)
        self.spread(m, ev.per_device)
        self.report(m, "load", rec.reason, m.reserved, now - rec.since)
        self.after_start(m, rec)

    def _on_Woke(self, ev: Woke) -> None:
        self.take(ev.reading, ev.readings)
        m = self.models.get(ev.model)
        if m is None or m.state != State.WAKING:
            return
        rec = m.rec
        assert isinstance(rec, Starting)
        now = self.clock()
        self.to(m, State.READY)
        m.last_used = now
        self.learn(m, ev.process_bytes)
        self.report(m, "wake", rec.reason, m.reserved, now - rec.since)
        self.after_start(m, rec)

    def after_start(self, m: Model, rec: Starting) -> None:
        """What was asked while it started: an unload, a removal, a reload with a new entry."""
        if m.removed:
            self.begin_stop(m, "removed")
        elif m.pending_entry is not None:
            self.begin_stop(m, "reload")
        elif rec.stop_after and not m.queue:
            self.begin_stop(m, rec.stop_after)

    def learn(self, m: Model, measured: int | None) -> None:
        """Adopt a measured footprint. A split child pays the per-process overhead on each of its
        devices; what is remembered is the one-device equivalent, since placement adds the
        overhead again for every device of the next split."""
        if measured is None or measured <= 0:
            return
        extra = (len(m.placement) - 1) * m.overhead if len(m.placement) > 1 else 0
        m.measured = max(1, measured - extra)
        if m.holds_device:
            m.reserved = measured
        self.emit(Learn(m.entry, m.measured))

    def _on_Measured(self, ev: Measured) -> None:
        m = self.models.get(ev.model)
        if m is None or m.instance is not ev.instance or not ev.bytes:
            return
        self.learn(m, max(ev.bytes, m.measured or 0))

    def _on_LoadFailedEvent(self, ev: LoadFailedEvent) -> None:
        m = self.models.get(ev.model)
        if m is None or m.state not in STARTING:
            return
        rec = m.rec
        now = self.clock()
        self.to(m, State.UNLOADED)
        m.instance, m.reserved, m.host_reserved = None, 0, 0
        if self.closing:
            self.fail_queue(m, ShuttingDown("swapper is shutting down"))
        else:
            m.failed = True
            m.failures += 1
            m.exit_code, m.error, m.log_tail = ev.error.exit_code, str(ev.error), ev.error.log_tail[-50:]
            m.backoff_until = now + self.backoff(m)
            log.error("model %s failed to load after %.1fs: %s", m.id, ev.seconds, ev.error)
            self.report(m, "fail", getattr(rec, "reason", "demand"), 0, ev.seconds, str(ev.error))
            self.fail_queue(m, self.load_failed(m, now))
        self.stopped(m)

    def _on_Exited(self, ev: Exited) -> None:
        """A child died on its own. A crash is not a failed load: reload at once, unless it loops."""
        m = self.models.get(ev.model)
        if m is None or ev.instance is None or m.instance is not ev.instance or m.state == State.STOPPING:
            return  # stale, expected (being stopped), or reported by a failed start
        now = self.clock()
        looping = m.after_crash and now - m.loaded_at < self.cfg.crash_window
        log.error("model %s exited unexpectedly with status %s%s", m.id, ev.code,
                  " (crash loop: backing off)" if looping else "; it reloads on the next request")
        self.to(m, State.UNLOADED)
        m.instance, m.reserved, m.host_reserved = None, 0, 0
        m.exit_code = ev.code
        m.error = f"child exited unexpectedly with status {ev.code}"
        m.after_crash = True
        if looping:
            m.failed = True
            m.failures += 1
            m.backoff_until = now + self.backoff(m)
            self.fail_queue(m, self.load_failed(m, now))
        else:
            m.failures = 0
        self.report(m, "exit", "crash", 0, 0.0, m.error)
        self.stopped(m)

    def _on_Stopped(self, ev: Stopped) -> None:
        self.take(ev.reading, ev.readings)
        m = self.models.get(ev.model)
        if m is None or m.state != State.STOPPING:
            return
        rec = m.rec
        assert isinstance(rec, Leaving)
        nbytes = m.reserved
        if ev.slept:
            self.to(m, State.SLEEPING)
            m.host_reserved = nbytes or m.measured or 0
            m.reserved = 0
            self.report(m, "sleep", rec.reason, nbytes, ev.seconds)
            self.fit_host_budget()
            return
        self.to(m, State.UNLOADED)
        m.instance, m.reserved, m.host_reserved = None, 0, 0
        m.after_crash = False
        self.report(m, "evict" if rec.reason in ("budget", "ttl") else "unload", rec.reason, nbytes, ev.seconds)
        self.stopped(m)
        if m.pending_entry is not None:
            m.entry, m.pending_entry = m.pending_entry, None
            m.measured, m.estimate = None, 0
            if m.restart and not self.closing:
                self._internal -= 1
                m.queue.append(Waiter(self._internal, m.id, self.clock(), counts=False))
                m.next_reason = "reload"
            m.restart = False
        if m.removed and not m.queue:
            del self.models[m.id]

    def stopped(self, m: Model) -> None:
        waiters, m.stop_waiters = m.stop_waiters, []
        for wid in waiters:
            self.emit(Done(wid))

    # ------------------------------------------------------------------ commands

    def _on_Unload(self, ev: Unload) -> None:
        m = self.models.get(ev.model)
        if m is None:
            return self.emit(Fail(ev.waiter, UnknownModel(f"model '{ev.model}' not found")))
        if m.pinned and not ev.force:
            return self.emit(Fail(ev.waiter, Pinned(f"model '{m.id}' is pinned; unload it with force")))
        if ev.refuse_if_unloaded and m.state.public == "unloaded" and not m.queue:
            return self.emit(Fail(ev.waiter, NotLoaded(f"model '{m.id}' is not running")))
        self.fail_queue(m, Unloaded(f"model '{m.id}' was unloaded"))
        m.stop_waiters.append(ev.waiter)
        if m.state == State.AWAITING_ROOM:
            self.release_claim(m)
        if m.state == State.UNLOADED:
            self.stopped(m)
        elif m.state in STARTING:
            self.amend(m, stop_after=ev.reason)
        else:
            self.begin_stop(m, ev.reason)

    def _on_SetPinned(self, ev: SetPinned) -> None:
        m = self.models.get(ev.model)
        if m is not None:
            m.pinned = ev.pinned
            self.revision += 1

    def _on_CatalogChanged(self, ev: CatalogChanged) -> None:
        """Adopt a reloaded catalog: new models appear, changed ones restart, removed ones go."""
        self.names = [e.id for e in ev.entries]
        seen = set()
        for e in ev.entries:
            seen.add(e.id)
            m = self.models.get(e.id)
            if m is None:
                self.models[e.id] = Model(entry=e, pinned=e.pinned)
                continue
            m.removed = False
            m.pinned = e.pinned
            if launch_key(e) == launch_key(m.entry if m.pending_entry is None else m.pending_entry):
                m.entry = dataclasses.replace(m.entry, aliases=e.aliases, idle_ttl=e.idle_ttl, pinned=e.pinned)
                continue
            if m.state == State.UNLOADED:
                m.entry, m.measured, m.estimate = e, None, 0
                continue
            log.info("model %s changed: restarting it with the new settings", m.id)
            m.pending_entry = e
            m.restart = e.pinned or e.id in ev.eager or bool(m.queue)
            if m.state == State.AWAITING_ROOM:
                self.release_claim(m)
            if m.state in (State.READY, State.DRAINING, State.SLEEPING):
                self.begin_stop(m, "reload")
            elif m.state == State.UNLOADED:
                m.entry, m.pending_entry, m.restart = e, None, False
        for mid, m in list(self.models.items()):
            if mid in seen:
                continue
            m.removed = True
            self.fail_queue(m, Unloaded(f"model '{mid}' was removed from the catalog"))
            if m.state == State.AWAITING_ROOM:
                self.release_claim(m)
            if m.state == State.UNLOADED:
                del self.models[mid]
            elif m.state in (State.READY, State.DRAINING, State.SLEEPING):
                self.begin_stop(m, "removed")
        self.revision += 1

    def _on_Shutdown(self, ev: Shutdown) -> None:
        self.closing = True
        deadline = self.clock() + ev.drain_timeout
        for m in self.models.values():
            self.fail_queue(m, ShuttingDown("swapper is shutting down"))
            if m.state == State.AWAITING_ROOM:
                self.release_claim(m)
            if m.state in SERVING or m.state == State.SLEEPING:
                self.begin_stop(m, "shutdown", deadline=deadline)
        if any(m.state in STARTING for m in self.models.values()):
            self.emit(CancelStarts())

    # ------------------------------------------------------------------ time

    def _on_Tick(self, ev: Tick) -> None:
        self.take(ev.reading, ev.readings)
        now = self.clock()
        for mid, b in ev.seen.items():
            if mid in self.models:
                self.models[mid].seen_bytes = b
        for m in self.models.values():
            if m.state not in STARTING:  # queue.timeout bounds the wait until the load starts
                for w in [w for w in m.queue if w.counts and now - w.enqueued >= self.cfg.queue_timeout]:
                    m.queue.remove(w)
                    self.emit(Fail(w.id, QueueTimeout(
                        f"request for model '{m.id}' waited {now - w.enqueued:.0f}s for its model to start "
                        f"loading (queue timeout {self.cfg.queue_timeout:g}s)")))
            if m.state == State.DRAINING and m.drain_deadline is not None and now >= m.drain_deadline:
                log.warning("model %s: drain timeout with %d requests in flight; stopping", m.id, m.inflight)
                self.stop_now(m)
        self.ttl(now)

    # ------------------------------------------------------------------ helpers

    def backoff(self, m: Model) -> float:
        return min(self.cfg.backoff_max, self.cfg.backoff_base * 2 ** (max(1, m.failures) - 1))

