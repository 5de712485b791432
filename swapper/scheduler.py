"""The scheduler: which models are resident, who waits, and what gets evicted.

Pure logic with the clock, the memory probe, the estimator and the launcher (the only thing
that touches processes) injected. It is the one owner of mutable model state; every decision
(start, stop, grant, fail) happens inside `_pump()`, which runs synchronously on the event loop,
so no decision ever races another. Effects (starting, stopping, sleeping, waking children) run
as tasks and report back through `_on_*` methods that change state and pump again.

Rules (DESIGN.md):
1. A model is resident when its child is healthy; readiness = at least one resident.
2. A load reserves its estimate in the ledger; once healthy the measured footprint replaces it
   (per-process use when the driver shows it, else device used-memory before vs after, with
   loads serialised on the device) and is remembered for the next estimate.
3. To fit a load, evict least-recently-used models with nothing in flight and nothing queued;
   pinned models never; busy models are drained, never killed under a stream. If nothing can be
   evicted, requests wait in their queue. A model that cannot fit even an empty budget is
   refused at once (`insufficient_memory`).
4. Each model has a bounded FIFO of waiting requests: full -> 503, too long -> 504, client gone
   -> removed (and no load starts for nobody).
5. No thrash: a freshly loaded model first serves what queued for it; after `max_wait` a
   waiting model gets the busy model drained for it; idle TTL never unloads the last resident.
6. The probe is the truth about memory others use: a load starts only if it fits both the
   ledger and what the probe reports free.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, AsyncIterator, Callable, Iterable, Protocol, Sequence

from .catalog import Adapter, Catalog, ModelEntry
from .estimate import Estimator
from .gpu import MemoryProbe
from .units import SizeSpec, format_bytes

log = logging.getLogger("swapper.scheduler")


# ------------------------------------------------------------------------------- errors


class SchedulerError(Exception):
    """A request the scheduler cannot serve; maps onto DESIGN.md's error table."""

    status = 503
    code = "service_unavailable"
    type = "server_error"

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class QueueFull(SchedulerError):
    status, code = 503, "queue_full"


class QueueTimeout(SchedulerError):
    status, code = 504, "queue_timeout"


class InsufficientMemory(SchedulerError):
    status, code = 503, "insufficient_memory"


class LoadFailed(SchedulerError):
    status, code = 503, "model_load_failed"


class ShuttingDown(SchedulerError):
    status, code = 503, "shutting_down"


class UnknownModel(SchedulerError):
    """The model left the catalog (reload) between resolution and the lease."""

    status, code, type = 404, "model_not_found", "invalid_request_error"


class Unloaded(SchedulerError):
    """A manual load whose model was unloaded or removed before it became ready."""

    status, code = 503, "model_unloaded"


class NotLoaded(SchedulerError):
    """A request with autoload off (`--no-models-autoload`, `?autoload=false`) for a model that is
    not loaded: llama.cpp router's 400 "model is not loaded"."""

    status, code, type = 400, "model_not_loaded", "invalid_request_error"


class LoadError(Exception):
    """Raised by a launcher when a child fails to start."""

    def __init__(self, message: str, exit_code: int | None = None, log_tail: Sequence[str] = ()):
        super().__init__(message)
        self.exit_code = exit_code
        self.log_tail = list(log_tail)


# ------------------------------------------------------------------------------ effects


class Instance(Protocol):
    """A running child as the scheduler sees it."""

    base_url: str

    def pids(self) -> list[int]: ...


class Launcher(Protocol):
    """The edge that turns decisions into processes."""

    async def start(self, entry: ModelEntry, reserved: int,
                    on_exit: Callable[[int | None], None]) -> Instance: ...

    async def stop(self, instance: Instance, entry: ModelEntry) -> None: ...

    def can_sleep(self, entry: ModelEntry) -> bool: ...

    async def sleep(self, instance: Instance, entry: ModelEntry) -> None: ...

    async def wake(self, instance: Instance, entry: ModelEntry) -> None: ...

    def prefetch(self, entry: ModelEntry) -> None: ...


# -------------------------------------------------------------------------------- state


class State(str, Enum):
    UNLOADED = "unloaded"
    EVICTING = "evicting"  # admitted; waiting for victims to stop and memory to show free
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"  # no new requests; stops when in-flight requests finish
    STOPPING = "stopping"
    SLEEPING = "sleeping"  # engine alive, device memory released (warm tier)
    WAKING = "waking"

    @property
    def public(self) -> str:
        """llama.cpp router's status values: unloaded | loading | loaded | sleeping."""
        return {
            State.UNLOADED: "unloaded", State.EVICTING: "loading", State.LOADING: "loading",
            State.READY: "loaded", State.DRAINING: "loaded", State.STOPPING: "loaded",
            State.SLEEPING: "sleeping", State.WAKING: "loading",
        }[self]


HOLDS_DEVICE = {State.EVICTING, State.LOADING, State.READY, State.DRAINING, State.STOPPING, State.WAKING}
COUNTS_RESIDENT = {State.EVICTING, State.LOADING, State.READY, State.DRAINING, State.WAKING}


@dataclass
class Waiter:
    model: str
    enqueued: float
    future: asyncio.Future
    counts: bool = True  # a request (takes an in-flight slot) vs a manual load


@dataclass
class SwapEvent:
    time: float  # wall clock
    model: str
    action: str  # load | evict | sleep | wake | unload | fail | exit
    reason: str  # demand | manual | budget | ttl | drain | shutdown | reload | crash
    bytes: int = 0
    seconds: float = 0.0
    detail: str = ""


@dataclass
class Model:
    """The scheduler's record of one model."""

    entry: ModelEntry
    state: State = State.UNLOADED
    inflight: int = 0
    queue: deque[Waiter] = field(default_factory=deque)
    last_used: float = 0.0
    reserved: int = 0  # device bytes in the ledger
    host_reserved: int = 0  # host bytes while sleeping
    measured: int | None = None
    instance: Instance | None = None
    failed: bool = False
    exit_code: int | None = None
    error: str | None = None
    log_tail: list[str] = field(default_factory=list)
    failures: int = 0
    backoff_until: float = 0.0
    pinned: bool = False
    victim_of: str | None = None  # the model this one is being evicted for
    stop_reason: str = ""
    stop_target: State = State.UNLOADED  # UNLOADED or SLEEPING
    evicting_since: float = 0.0
    transition_started: float = 0.0
    drain_deadline: float | None = None
    used_before: int | None = None  # device used memory before a serialised load
    first_request_measured: bool = False
    load_reason: str = "demand"
    removed: bool = False
    stop_waiters: list[asyncio.Future] = field(default_factory=list)
    load_seconds: float | None = None
    prefetch_asked: bool = False  # files read ahead while it waits for room
    seen_bytes: int = 0  # probe's reading of a loading child (cached, see Scheduler._seen_bytes)
    seen_at: float = float("-inf")

    @property
    def id(self) -> str:
        return self.entry.id

    @property
    def holds_device(self) -> bool:
        return self.state in HOLDS_DEVICE


@dataclass(frozen=True)
class Candidate:
    """What `plan_eviction` needs to know of a resident model."""

    id: str
    bytes: int
    last_used: float
    inflight: int = 0
    queued: int = 0
    pinned: bool = False
    state: State = State.READY


def plan_eviction(need_bytes: int, need_slots: int, candidates: Iterable[Candidate],
                  include_busy: bool = False) -> list[str] | None:
    """Victims that free `need_bytes` and `need_slots`, least recently used first.

    Only ready, unpinned models with nothing queued are candidates; busy ones only when
    `include_busy` (they will be drained, never killed). Victims that turn out unnecessary once
    a later (larger) one is chosen are dropped again. None when no choice suffices.
    """
    eligible = sorted(
        (c for c in candidates
         if c.state == State.READY and not c.pinned and c.queued == 0 and (include_busy or c.inflight == 0)),
        key=lambda c: (c.last_used, c.id),
    )
    chosen: list[Candidate] = []
    freed = slots = 0
    for c in eligible:
        if freed >= need_bytes and slots >= need_slots:
            break
        chosen.append(c)
        freed += c.bytes
        slots += 1
    if freed < need_bytes or slots < need_slots:
        return None
    for c in list(chosen):  # oldest first: drop what a later victim made unnecessary
        if freed - c.bytes >= need_bytes and slots - 1 >= need_slots:
            chosen.remove(c)
            freed -= c.bytes
            slots -= 1
    return [c.id for c in chosen]


@dataclass
class Lease:
    """A granted request: the child to send it to."""

    model: Model
    instance: Instance
    adapter: Adapter | None = None

    @property
    def entry(self) -> ModelEntry:
        return self.model.entry


@dataclass
class SchedulerConfig:
    budget: SizeSpec = field(default_factory=lambda: SizeSpec(fraction=0.9))
    reserve: int = 0
    host_budget: SizeSpec = field(default_factory=lambda: SizeSpec(bytes=16 << 30))
    max_models: int = 0
    queue_size: int = 64
    queue_timeout: float = 300.0
    max_wait: float = 60.0
    idle_ttl: float = 0.0
    drain_timeout: float = 30.0
    backoff_base: float = 1.0
    backoff_max: float = 60.0
    settle: float = 2.0  # how long the probe may lag behind a stop before more is evicted
    prefetch: bool = True


# ---------------------------------------------------------------------------- scheduler


class Scheduler:
    def __init__(self, catalog: Catalog, probe: MemoryProbe, launcher: Launcher, estimator: Estimator,
                 config: SchedulerConfig | None = None, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time):
        self.cfg = config or SchedulerConfig()
        self.probe = probe
        self.launcher = launcher
        self.estimator = estimator
        self.clock = clock
        self.wall = wall
        self.models: dict[str, Model] = {}
        self.events: deque[SwapEvent] = deque(maxlen=200)
        self.listeners: list[Callable[[SwapEvent], None]] = []
        self.grant_listeners: list[Callable[[str, float], None]] = []  # (model, seconds waited)
        self.closing = False
        self._tasks: set[asyncio.Task] = set()
        self._pumping = False
        self._repump = False
        # whether the driver attributes device memory to our children's PIDs: unknown until a
        # load tells; while not known to be true, loads are serialised on the device
        self.pid_visible: bool | None = True if probe.kind in ("host",) else None
        self._total = self._probe_total()
        self.set_catalog(catalog)

    # ---------------------------------------------------------------- catalog & numbers

    def set_catalog(self, catalog: Catalog) -> None:
        """Adopt a new catalog (reload): new models appear, removed resident ones drain."""
        self.catalog = catalog
        seen = set()
        for e in catalog:
            seen.add(e.id)
            m = self.models.get(e.id)
            if m is None:
                self.models[e.id] = Model(entry=e, pinned=e.pinned)
            else:
                m.removed = False
                m.pinned = e.pinned
                if m.state == State.UNLOADED:
                    m.entry = e
        for mid, m in list(self.models.items()):
            if mid in seen:
                continue
            m.removed = True
            self._fail_queue(m, Unloaded(f"model '{mid}' was removed from the catalog"))
            if m.state == State.UNLOADED:
                del self.models[mid]
            elif m.state in (State.READY, State.SLEEPING):
                self._begin_stop(m, "reload")
        self._pump()

    def _probe_total(self) -> int:
        try:
            return self.probe.memory().total
        except Exception as e:
            log.warning("memory probe failed: %s", e)
            return 0

    @property
    def capacity(self) -> int:
        """Bytes the ledger may plan with: budget (absolute or share of the device) - reserve."""
        return max(0, self.cfg.budget.resolve(self._total) - self.cfg.reserve)

    @property
    def host_capacity(self) -> int:
        try:
            total = self.probe.memory().total if self.probe.kind == "host" else _host_total()
        except Exception:
            total = 0
        return self.cfg.host_budget.resolve(total)

    def ledger_used(self, exclude: Model | None = None) -> int:
        return sum(m.reserved for m in self.models.values() if m.holds_device and m is not exclude)

    def host_used(self) -> int:
        return sum(m.host_reserved for m in self.models.values() if m.state == State.SLEEPING)

    def need(self, m: Model) -> int:
        if m.measured:
            return m.measured
        return self.estimator.estimate(m.entry).bytes

    def _unreflected(self, m: Model) -> int:
        """Bytes a starting model will take that the probe does not show yet."""
        if m.state == State.EVICTING:
            return m.reserved
        if self.pid_visible and m.instance is not None:
            return max(0, m.reserved - self._seen_bytes(m))
        return m.reserved

    def _seen_bytes(self, m: Model) -> int:
        """What the probe shows a loading child holding, re-read at most every half second:
        pumps run on every request, and reading a big process tree is not free."""
        now = self.clock()
        if now - m.seen_at >= 0.5 and m.instance is not None:
            try:
                m.seen_bytes = self.probe.process_bytes(m.instance.pids()) or 0
            except Exception:
                m.seen_bytes = 0
            m.seen_at = now
        return m.seen_bytes

    def room(self, exclude: Model | None = None) -> int:
        """Free bytes for a load: the smaller of what the ledger and the probe allow."""
        ledger_free = self.capacity - self.ledger_used(exclude)
        try:
            mem = self.probe.memory()
        except Exception as e:
            log.warning("memory probe failed, planning with the ledger alone: %s", e)
            return ledger_free
        pending = sum(self._unreflected(m) for m in self.models.values()
                      if m is not exclude and m.state in (State.EVICTING, State.LOADING, State.WAKING))
        probe_free = mem.free - self.cfg.reserve - pending
        return min(ledger_free, probe_free)

    def resident_count(self, exclude: Model | None = None) -> int:
        return sum(1 for m in self.models.values() if m.state in COUNTS_RESIDENT and m is not exclude)

    @property
    def ready(self) -> bool:
        return any(m.state in (State.READY, State.DRAINING) for m in self.models.values())

    # ------------------------------------------------------------------------ requests

    @contextlib.asynccontextmanager
    async def acquire(self, model_id: str, adapter: Adapter | None = None, *,
                      autoload: bool = True) -> AsyncIterator[Lease]:
        """Wait until the model is resident and hold an in-flight slot on it; with autoload off, a
        model that is not loaded (nor loading) is refused with `NotLoaded` instead of loaded."""
        m = self._model(model_id)
        if not autoload and m.state in (State.UNLOADED, State.STOPPING):
            raise NotLoaded("model is not loaded")
        waiter = self._enqueue(m, counts=True)
        granted = False
        try:
            instance = await waiter.future
            granted = True
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled() and waiter.future.exception() is None:
                granted = True  # granted in the same instant the client left: give the slot back
                self._release(m)
            else:
                self._leave(m, waiter)
            raise
        try:
            yield Lease(m, instance, adapter)
        finally:
            if granted:
                self._release(m)

    async def load(self, model_id: str, reason: str = "manual") -> None:
        """Make a model resident without a request (admin load, preload, pins)."""
        m = self._model(model_id)
        if m.state in (State.READY, State.DRAINING):
            if m.state == State.DRAINING and m.stop_reason != "shutdown":
                self._cancel_drain(m)
            return
        waiter = self._enqueue(m, counts=False, bounded=False, reason=reason)
        try:
            await waiter.future
        except asyncio.CancelledError:
            self._leave(m, waiter)
            raise

    async def unload(self, model_id: str, force: bool = False, reason: str = "manual") -> None:
        """Drain in-flight requests, then stop (or fail queued waiters of a loading model)."""
        m = self._model(model_id)
        if m.pinned and not force:
            raise PermissionError(f"model '{model_id}' is pinned; unload it with force")
        if m.state in (State.UNLOADED,) and not m.queue:
            return
        done = asyncio.get_running_loop().create_future()
        m.stop_waiters.append(done)
        self._fail_queue(m, Unloaded(f"model '{model_id}' was unloaded"))
        if m.state in (State.READY, State.DRAINING, State.SLEEPING):
            self._begin_stop(m, reason)
        elif m.state == State.EVICTING:
            self._release_claim(m)
            if m.state == State.SLEEPING:
                self._begin_stop(m, reason)
            else:
                self._notify_stopped(m)
        elif m.state == State.UNLOADED:
            self._notify_stopped(m)
        # LOADING / WAKING: stopped as soon as the load finishes (queue is empty, unload flag)
        else:
            m.stop_reason = reason
        self._pump()
        await done

    def set_pinned(self, model_id: str, pinned: bool) -> None:
        """Pin (never evicted, never TTL-unloaded) or unpin a model until the next reload."""
        m = self._model(model_id)
        m.pinned = bool(pinned)
        self._pump()

    def _model(self, model_id: str) -> Model:
        if self.closing:
            raise ShuttingDown("swapper is shutting down")
        m = self.models.get(model_id)
        if m is None or m.removed:
            raise UnknownModel(f"model '{model_id}' not found; known models: {', '.join(self.catalog.names())}")
        return m

    def _enqueue(self, m: Model, counts: bool, bounded: bool = True, reason: str = "demand") -> Waiter:
        now = self.clock()
        need = self.need(m)
        if need > self.capacity:
            raise InsufficientMemory(
                f"model '{m.id}' needs {format_bytes(need)} but the budget holds only "
                f"{format_bytes(self.capacity)} (budget {self.cfg.budget} of "
                f"{format_bytes(self._total)} minus reserve {format_bytes(self.cfg.reserve)})")
        if m.failed and now < m.backoff_until and m.state == State.UNLOADED:
            raise self._load_failed(m, now)
        fut = asyncio.get_running_loop().create_future()
        w = Waiter(m.id, now, fut, counts)
        if m.state == State.READY:
            self._grant(m, w)
            return w
        if bounded and sum(1 for x in m.queue if x.counts) >= self.cfg.queue_size:
            raise QueueFull(f"queue for model '{m.id}' is full ({self.cfg.queue_size} waiting)",
                            retry_after=self._retry_after(m))
        if not m.queue and m.state == State.UNLOADED:
            m.load_reason = reason
        m.queue.append(w)
        self._pump()
        return w

    def _grant(self, m: Model, w: Waiter) -> None:
        if w.future.done():
            return
        now = self.clock()
        if w.counts:
            m.inflight += 1
            for fn in self.grant_listeners:
                fn(m.id, now - w.enqueued)
        m.last_used = now
        w.future.set_result(m.instance)

    def _release(self, m: Model) -> None:
        m.inflight = max(0, m.inflight - 1)
        m.last_used = self.clock()
        if not m.first_request_measured and m.state in (State.READY, State.DRAINING) and m.instance:
            m.first_request_measured = True
            self._measure(m, after_request=True)
        self._pump()

    def _leave(self, m: Model, w: Waiter) -> None:
        with contextlib.suppress(ValueError):
            m.queue.remove(w)
        if not w.future.done():
            w.future.cancel()
        self._pump()

    def _fail_queue(self, m: Model, err: Exception) -> None:
        while m.queue:
            w = m.queue.popleft()
            if not w.future.done():
                w.future.set_exception(err)
                w.future.exception()  # mark retrieved: a manual load may have nobody awaiting it

    def _retry_after(self, m: Model) -> float:
        return max(1.0, math.ceil(m.load_seconds or 5.0))

    def _load_failed(self, m: Model, now: float) -> LoadFailed:
        left = max(1.0, math.ceil(m.backoff_until - now))
        tail = "\n".join(m.log_tail[-10:])
        msg = f"model '{m.id}' failed to load: {m.error or 'unknown error'}"
        if tail:
            msg += f"\n--- last log lines ---\n{tail}"
        return LoadFailed(msg, retry_after=left)

    # ---------------------------------------------------------------------------- pump

    def _pump(self) -> None:
        """Make every decision the current state allows. Re-entrant calls fold into one."""
        if self._pumping:
            self._repump = True
            return
        self._pumping = True
        try:
            for _ in range(100):
                self._repump = False
                self._pump_once()
                if not self._repump:
                    break
        finally:
            self._pumping = False

    def _pump_once(self) -> None:
        now = self.clock()
        for m in self.models.values():
            if m.state == State.READY:
                while m.queue:
                    self._grant(m, m.queue.popleft())
            elif m.state == State.DRAINING and m.inflight == 0:
                self._stop_now(m)
            elif m.state == State.EVICTING and not m.queue:
                self._release_claim(m)
            if not m.queue:
                m.prefetch_asked = False
        if self.closing:
            return
        pending = sorted((m for m in self.models.values()
                          if m.queue and m.state in (State.UNLOADED, State.SLEEPING, State.EVICTING)),
                         key=lambda m: m.queue[0].enqueued)
        blocked_head: Model | None = None
        for m in pending:
            if m.state == State.UNLOADED and m.failed and now < m.backoff_until:
                self._fail_queue(m, self._load_failed(m, now))
                continue
            if m.state == State.EVICTING:
                self._advance_claim(m, now)
                if m.state == State.EVICTING:
                    blocked_head = blocked_head or m
                continue
            # a model queued behind a blocked one may only start if it evicts nothing and the
            # blocked one has not waited past max_wait (no starvation of big models)
            if blocked_head is not None:
                if now - blocked_head.queue[0].enqueued < self.cfg.max_wait:
                    self._admit(m, now, evict=False)
                self._prefetch_waiting(m)
                continue
            if not self._admit(m, now, evict=True):
                blocked_head = m
                self._prefetch_waiting(m)
                if now - m.queue[0].enqueued >= self.cfg.max_wait:
                    self._drain_for(m)

    def _needs_serial(self) -> bool:
        return not self.pid_visible

    def _admit(self, m: Model, now: float, evict: bool) -> bool:
        """Start `m` if it fits (evicting idle victims when allowed). True if it started."""
        need = self.need(m)
        if need > self.capacity:
            self._fail_queue(m, InsufficientMemory(
                f"model '{m.id}' needs {format_bytes(need)} but the budget holds only {format_bytes(self.capacity)}"))
            return True
        if self._serial_blocked():
            return False
        slots_needed = self._slots_needed(m)
        room = self.room(exclude=m)
        if room >= need and slots_needed == 0:
            self._start(m, now)
            return True
        if not evict:
            return False
        victims = plan_eviction(max(0, need - room), slots_needed, self._candidates(exclude=m))
        if victims is None:
            return False
        log.info("evicting %s to fit %s (%s)", ", ".join(victims), m.id, format_bytes(need))
        self._claim(m, need, victims, now)
        self._advance_claim(m, now)
        return True

    def _serial_blocked(self) -> bool:
        """Loads are serialised on this device and one is already running."""
        return self._needs_serial() and any(x.state in (State.LOADING, State.WAKING) for x in self.models.values())

    def _slots_needed(self, m: Model) -> int:
        """Resident models that must go before `m` fits under `max_models` (0 without a cap)."""
        if not self.cfg.max_models:
            return 0
        return max(0, self.resident_count(exclude=m) + 1 - self.cfg.max_models)

    def _claim(self, m: Model, need: int, victims: list[str], now: float) -> None:
        """Admit `m` behind its victims: hold its reservation while they drain (if busy) and stop."""
        m.state = State.EVICTING
        m.reserved = need
        m.evicting_since = now
        m.transition_started = now
        for vid in victims:
            v = self.models[vid]
            v.victim_of = m.id
            self._begin_stop(v, "budget")
        self._prefetch(m)

    def _candidates(self, exclude: Model) -> list[Candidate]:
        return [Candidate(x.id, x.reserved, x.last_used, x.inflight, len(x.queue), x.pinned, x.state)
                for x in self.models.values() if x is not exclude and x.state == State.READY]

    def _advance_claim(self, m: Model, now: float) -> None:
        """An admitted model whose victims are stopping: start once memory shows free."""
        if any(x.victim_of == m.id and x.state in (State.DRAINING, State.STOPPING) for x in self.models.values()):
            return
        if self._serial_blocked():
            return
        if self.room(exclude=m) >= m.reserved and self._slots_needed(m) == 0:
            self._start(m, now)
            return
        if now - m.evicting_since < self.cfg.settle:
            return  # the device may lag behind the stop for a moment
        # still short (memory taken by someone else meanwhile): plan again from scratch
        self._release_claim(m)
        self._admit(m, now, evict=True)

    def _release_claim(self, m: Model) -> None:
        m.state = State.UNLOADED if m.instance is None else State.SLEEPING
        m.reserved = 0
        for x in self.models.values():
            if x.victim_of == m.id:
                x.victim_of = None
                if x.state == State.DRAINING and x.stop_reason == "budget":
                    self._cancel_drain(x)

    def _cancel_drain(self, x: Model) -> None:
        x.state = State.READY
        x.drain_deadline = None
        x.stop_reason = ""
        x.victim_of = None

    def _drain_for(self, m: Model) -> None:
        """`m` has waited past max_wait: drain busy models (LRU) so it can load next."""
        if any(x.victim_of == m.id for x in self.models.values()):
            return
        need = self.need(m)
        victims = plan_eviction(max(0, need - self.room(exclude=m)), self._slots_needed(m),
                                self._candidates(exclude=m), include_busy=True)
        if not victims:
            return
        log.info("%s waited %.0fs: draining %s for it", m.id, self.cfg.max_wait, ", ".join(victims))
        self._claim(m, need, victims, self.clock())

    def _prefetch_waiting(self, m: Model) -> None:
        """Requests are queued but the model cannot start yet: read its files meanwhile."""
        if m.state == State.UNLOADED and not m.prefetch_asked:
            m.prefetch_asked = True
            self._prefetch(m)

    def _prefetch(self, m: Model) -> None:
        """Overlap the incoming model's disk reads with the victims' drain and stop."""
        if not self.cfg.prefetch:
            return
        try:
            self.launcher.prefetch(m.entry)
        except Exception as e:
            log.debug("prefetch of %s failed: %s", m.id, e)

    # -------------------------------------------------------------------------- loading

    def _start(self, m: Model, now: float) -> None:
        sleeping = m.state == State.SLEEPING or (m.state == State.EVICTING and m.instance is not None)
        m.reserved = self.need(m)
        m.prefetch_asked = False
        m.transition_started = m.transition_started if m.state == State.EVICTING else now
        if sleeping:
            m.host_reserved = 0
            m.state = State.WAKING
            self._spawn(self._wake(m))
            return
        m.state = State.LOADING
        if self._needs_serial():
            try:
                m.used_before = self.probe.memory().used
            except Exception:
                m.used_before = None
        self._spawn(self._load(m))

    async def _load(self, m: Model) -> None:
        t0 = self.clock()

        def on_exit(code: int | None, m: Model = m) -> None:
            self._on_exit(m, code)

        try:
            inst = await self.launcher.start(m.entry, m.reserved, on_exit)
        except asyncio.CancelledError:
            m.state = State.UNLOADED
            m.reserved = 0
            self._fail_queue(m, ShuttingDown("swapper is shutting down"))
            raise
        except LoadError as e:
            self._on_load_failed(m, e, self.clock() - t0)
            return
        except Exception as e:  # a bug in the launcher must not wedge the model
            log.exception("starting %s failed", m.id)
            self._on_load_failed(m, LoadError(str(e)), self.clock() - t0)
            return
        self._on_loaded(m, inst, self.clock() - t0)

    def _on_loaded(self, m: Model, inst: Instance, seconds: float) -> None:
        m.instance = inst
        m.state = State.READY
        m.failed = False
        m.failures = 0
        m.error = None
        m.exit_code = None
        m.load_seconds = seconds
        m.first_request_measured = False
        m.last_used = self.clock()
        total = self.clock() - m.transition_started if m.transition_started else seconds
        self._measure(m, after_request=False)
        self._event(m, "load", m.load_reason, m.reserved, total)
        m.load_reason = "demand"
        if m.removed or (m.stop_reason and not m.queue):
            self._begin_stop(m, m.stop_reason or "reload")
        self._pump()

    def _measure(self, m: Model, after_request: bool) -> None:
        """Replace the estimate with what the probe shows, and remember it."""
        if m.instance is None:
            return
        measured: int | None = None
        try:
            measured = self.probe.process_bytes(m.instance.pids())
        except Exception as e:
            log.debug("per-process memory unavailable: %s", e)
        if self.pid_visible is None and not after_request:
            self.pid_visible = measured is not None
        if measured is None and m.used_before is not None and not after_request:
            try:
                measured = max(0, self.probe.memory().used - m.used_before)
            except Exception:
                measured = None
        if measured is None or measured <= 0:
            return
        if after_request and m.measured:
            measured = max(measured, m.measured)
        m.measured = measured
        if m.holds_device:
            m.reserved = measured
        with contextlib.suppress(Exception):
            self.estimator.learn(m.entry, measured)

    def _on_load_failed(self, m: Model, e: LoadError, seconds: float) -> None:
        now = self.clock()
        m.state = State.UNLOADED
        m.instance = None
        m.reserved = 0
        m.failed = True
        m.failures += 1
        m.exit_code = e.exit_code
        m.error = str(e)
        m.log_tail = e.log_tail[-50:]
        m.backoff_until = now + min(self.cfg.backoff_max, self.cfg.backoff_base * 2 ** (m.failures - 1))
        log.error("model %s failed to load after %.1fs: %s", m.id, seconds, e)
        self._event(m, "fail", m.load_reason, 0, seconds, str(e))
        self._fail_queue(m, self._load_failed(m, now))
        self._notify_stopped(m)
        self._pump()

    def _on_exit(self, m: Model, code: int | None) -> None:
        """A child exited on its own (crash, OOM kill) while we thought it was alive."""
        if m.state in (State.STOPPING, State.UNLOADED, State.LOADING):
            return  # expected, or reported by the failed start itself
        log.error("model %s exited unexpectedly with status %s", m.id, code)
        m.state = State.UNLOADED
        m.instance = None
        m.reserved = 0
        m.host_reserved = 0
        m.failed = True
        m.exit_code = code
        m.error = f"child exited unexpectedly with status {code}"
        m.failures += 1
        m.backoff_until = self.clock() + min(self.cfg.backoff_max, self.cfg.backoff_base * 2 ** (m.failures - 1))
        self._event(m, "exit", "crash", 0, 0.0, m.error)
        self._notify_stopped(m)
        self._pump()

    async def _wake(self, m: Model) -> None:
        t0 = self.clock()
        assert m.instance is not None
        try:
            await self.launcher.wake(m.instance, m.entry)
        except Exception as e:
            log.error("waking %s failed: %s; stopping it", m.id, e)
            m.state = State.STOPPING
            inst = m.instance
            with contextlib.suppress(Exception):
                await self.launcher.stop(inst, m.entry)
            self._on_load_failed(m, LoadError(f"wake failed: {e}"), self.clock() - t0)
            return
        m.state = State.READY
        m.last_used = self.clock()
        self._measure(m, after_request=False)
        self._event(m, "wake", m.load_reason, m.reserved, self.clock() - (m.transition_started or t0))
        m.load_reason = "demand"
        self._pump()

    # ------------------------------------------------------------------------- stopping

    def _begin_stop(self, m: Model, reason: str) -> None:
        if m.state == State.SLEEPING:
            m.stop_reason = reason
            m.stop_target = State.UNLOADED
            m.state = State.STOPPING
            m.transition_started = self.clock()
            self._spawn(self._stop(m))
            return
        if m.state not in (State.READY, State.DRAINING):
            return
        m.stop_reason = reason
        if m.inflight > 0:  # never killed under a stream: drain first
            m.state = State.DRAINING
            m.drain_deadline = self.clock() + self.cfg.drain_timeout if reason in ("shutdown", "manual", "reload") else None
            return
        self._stop_now(m)

    def _stop_now(self, m: Model) -> None:
        if m.state not in (State.READY, State.DRAINING):
            return
        sleep = (m.entry.sleep and m.stop_reason in ("budget", "ttl")
                 and self._can_sleep(m) and not m.removed)
        m.stop_target = State.SLEEPING if sleep else State.UNLOADED
        m.state = State.STOPPING
        m.drain_deadline = None
        m.transition_started = self.clock()
        self._spawn(self._stop(m))

    def _can_sleep(self, m: Model) -> bool:
        try:
            return bool(self.launcher.can_sleep(m.entry))
        except Exception:
            return False

    async def _stop(self, m: Model) -> None:
        t0 = self.clock()
        inst = m.instance
        bytes_ = m.reserved
        if m.stop_target == State.SLEEPING and inst is not None:
            try:
                await self.launcher.sleep(inst, m.entry)
            except Exception as e:
                log.warning("sleeping %s failed (%s); stopping it instead", m.id, e)
                m.stop_target = State.UNLOADED
        if m.stop_target == State.UNLOADED and inst is not None:
            try:
                await self.launcher.stop(inst, m.entry)
            except Exception:
                log.exception("stopping %s failed", m.id)
        seconds = self.clock() - t0
        if m.stop_target == State.SLEEPING:
            m.state = State.SLEEPING
            m.host_reserved = bytes_ or m.measured or 0
            m.reserved = 0
            self._event(m, "sleep", m.stop_reason, bytes_, seconds)
            self._fit_host_budget()
        else:
            m.state = State.UNLOADED
            m.instance = None
            m.reserved = 0
            m.host_reserved = 0
            action = "evict" if m.stop_reason in ("budget", "ttl") else "unload"
            self._event(m, action, m.stop_reason, bytes_, seconds)
            self._notify_stopped(m)
            if m.removed and not m.queue and m.id in self.models and self.catalog.get(m.id) is None:
                del self.models[m.id]
        m.victim_of = None
        m.stop_reason = ""
        self._pump()

    def _fit_host_budget(self) -> None:
        """Too many sleepers for host RAM: stop the least recently used ones for real."""
        cap = self.host_capacity
        sleepers = sorted((x for x in self.models.values() if x.state == State.SLEEPING), key=lambda x: x.last_used)
        used = self.host_used()
        for x in sleepers:
            if used <= cap:
                break
            used -= x.host_reserved
            self._begin_stop(x, "budget")

    def _notify_stopped(self, m: Model) -> None:
        waiters, m.stop_waiters = m.stop_waiters, []
        for f in waiters:
            if not f.done():
                f.set_result(None)

    # ---------------------------------------------------------------------------- time

    def tick(self) -> None:
        """Time-based rules: queue timeouts, max-wait hand-over, idle TTL, drain deadlines."""
        now = self.clock()
        for m in self.models.values():
            timed_out = [w for w in m.queue if now - w.enqueued >= self.cfg.queue_timeout and w.counts]
            for w in timed_out:
                m.queue.remove(w)
                if not w.future.done():
                    w.future.set_exception(QueueTimeout(
                        f"request for model '{m.id}' waited {now - w.enqueued:.0f}s in the queue "
                        f"(queue timeout {self.cfg.queue_timeout:g}s)"))
            if m.state == State.DRAINING and m.drain_deadline is not None and now >= m.drain_deadline:
                log.warning("model %s: drain timeout with %d requests in flight; stopping", m.id, m.inflight)
                self._stop_now(m)
        self._ttl(now)
        self._pump()

    def _ttl(self, now: float) -> None:
        resident = [m for m in self.models.values() if m.state in (State.READY, State.DRAINING, State.LOADING)]
        for m in resident:
            ttl = m.entry.idle_ttl if m.entry.idle_ttl is not None else self.cfg.idle_ttl
            if not ttl or m.pinned or m.state != State.READY or m.inflight or m.queue:
                continue
            if now - m.last_used < ttl:
                continue
            if sum(1 for x in self.models.values() if x.state in (State.READY, State.LOADING)) <= 1:
                return  # never unload the last resident model: the node would go unready
            log.info("model %s idle for %.0fs (ttl %gs): unloading", m.id, now - m.last_used, ttl)
            self._begin_stop(m, "ttl")

    # ------------------------------------------------------------------------ shutdown

    async def shutdown(self, drain_timeout: float | None = None) -> None:
        """Stop taking work, fail waiters, let in-flight requests finish, stop every child."""
        self.closing = True
        timeout = self.cfg.drain_timeout if drain_timeout is None else drain_timeout
        for m in self.models.values():
            self._fail_queue(m, ShuttingDown("swapper is shutting down"))
        for m in self.models.values():
            if m.state in (State.READY, State.DRAINING, State.SLEEPING):
                m.drain_deadline = None
                if m.state != State.SLEEPING and m.inflight:
                    m.state = State.DRAINING
                    m.stop_reason = "shutdown"
                else:
                    self._begin_stop(m, "shutdown")
        deadline = self.clock() + timeout
        while any(m.state == State.DRAINING for m in self.models.values()) and self.clock() < deadline:
            await asyncio.sleep(0.05)
            self._pump()
        for m in self.models.values():
            if m.state == State.DRAINING:
                self._stop_now(m)
        # loads in progress: cancel (the launcher kills what it started)
        for t in list(self._tasks):
            if t.get_name().startswith("load:"):
                t.cancel()
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    # --------------------------------------------------------------------------- plumbing

    def _spawn(self, coro: Any) -> None:
        name = getattr(coro, "__name__", "task")
        t = asyncio.get_running_loop().create_task(coro, name=f"{name.strip('_')}:{id(coro)}")
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    def _event(self, m: Model, action: str, reason: str, nbytes: int, seconds: float, detail: str = "") -> None:
        ev = SwapEvent(self.wall(), m.id, action, reason, int(nbytes or 0), float(seconds), detail)
        self.events.append(ev)
        for fn in list(self.listeners):
            try:
                fn(ev)
            except Exception:
                log.exception("swap event listener failed")

    async def settle(self) -> None:
        """Wait until no effect is running (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


def _host_total() -> int:
    import psutil

    return int(psutil.virtual_memory().total)
