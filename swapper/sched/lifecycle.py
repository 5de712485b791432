"""A model's lifecycle: its states, the legal transitions, and the one place that applies them.

Each state carries a record of what only that state needs (who a drain is for, when it gives
up, why a stop happens). `transition()` checks the table and replaces the record wholesale, so
nothing outlives the transition it belonged to: a victim that crashes mid-drain no longer
names its claimant, and a stale stop reason cannot stop the model after its next load.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

from ..catalog import ModelEntry
from .errors import IllegalTransition


class Instance(Protocol):
    """A running child as the scheduler sees it."""

    base_url: str

    def pids(self) -> list[int]: ...


class State(str, Enum):
    UNLOADED = "unloaded"
    AWAITING_ROOM = "awaiting_room"  # admitted: victims are stopping and memory must show free
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"  # takes no new requests; stops when its in-flight requests finish
    STOPPING = "stopping"
    SLEEPING = "sleeping"  # engine alive, device memory released (warm tier)
    WAKING = "waking"

    @property
    def public(self) -> str:
        """llama.cpp router's status values: unloaded | loading | loaded | sleeping."""
        return _PUBLIC[self]


_PUBLIC = {
    State.UNLOADED: "unloaded", State.AWAITING_ROOM: "loading", State.LOADING: "loading",
    State.READY: "loaded", State.DRAINING: "loaded", State.STOPPING: "loaded",
    State.SLEEPING: "sleeping", State.WAKING: "loading",
}

S = State
TRANSITIONS: dict[State, frozenset[State]] = {
    S.UNLOADED: frozenset({S.AWAITING_ROOM, S.LOADING}),
    S.AWAITING_ROOM: frozenset({S.LOADING, S.WAKING, S.UNLOADED, S.SLEEPING}),
    S.LOADING: frozenset({S.READY, S.UNLOADED}),
    S.READY: frozenset({S.DRAINING, S.STOPPING, S.UNLOADED}),
    S.DRAINING: frozenset({S.READY, S.STOPPING, S.UNLOADED}),
    S.STOPPING: frozenset({S.UNLOADED, S.SLEEPING}),
    S.SLEEPING: frozenset({S.AWAITING_ROOM, S.WAKING, S.STOPPING, S.UNLOADED}),
    S.WAKING: frozenset({S.READY, S.STOPPING, S.UNLOADED}),
}

HOLDS_DEVICE = frozenset({S.AWAITING_ROOM, S.LOADING, S.READY, S.DRAINING, S.STOPPING, S.WAKING})
COUNTS_RESIDENT = frozenset({S.AWAITING_ROOM, S.LOADING, S.READY, S.DRAINING, S.WAKING})
SERVING = frozenset({S.READY, S.DRAINING})  # takes or finishes requests
# "loaded" (status, /running, readiness, metrics, child metrics): the one definition everyone
# reads — the child is up and holds its memory, until its stop has finished
LOADED = frozenset({S.READY, S.DRAINING, S.STOPPING})
STARTING = frozenset({S.LOADING, S.WAKING})


# ------------------------------------------------------------------ per-state records


@dataclass(frozen=True)
class Idle:
    """UNLOADED, READY, SLEEPING: nothing in progress."""


@dataclass(frozen=True)
class AwaitingRoom:
    since: float
    from_sleep: bool  # a sleeping child wakes instead of starting


@dataclass(frozen=True)
class Starting:
    """LOADING or WAKING."""

    since: float  # when the model was admitted (includes waiting for room)
    reason: str
    stop_after: str = ""  # an unload asked for while it started: stop once it is up


@dataclass(frozen=True)
class Leaving:
    """DRAINING or STOPPING: why it goes, what it becomes, and for whom."""

    reason: str  # budget | ttl | manual | reload | shutdown | removed
    target: State = State.UNLOADED  # UNLOADED or SLEEPING
    for_model: str | None = None  # the claimant an eviction makes room for
    deadline: float | None = None  # drain gives up and stops at this time
    since: float = 0.0


Record = Idle | AwaitingRoom | Starting | Leaving
IDLE = Idle()


@dataclass
class Waiter:
    """Someone waiting for a model: a request (takes an in-flight slot) or a load command."""

    id: int
    model: str
    enqueued: float
    counts: bool = True


@dataclass
class Model:
    """The scheduler's record of one model (read-only outside the decision core)."""

    entry: ModelEntry
    state: State = State.UNLOADED
    rec: Record = IDLE
    inflight: int = 0
    queue: deque[Waiter] = field(default_factory=deque)
    last_used: float = 0.0
    reserved: int = 0  # device bytes in the ledger (all its devices together)
    placement: dict[str, float] = field(default_factory=dict)  # device id -> its part of `reserved`
    overhead: int = 0  # per-process bytes every device it touches pays (from the estimate)
    host_reserved: int = 0  # host bytes while sleeping
    estimate: int = 0  # bytes before it is measured (from the estimator, via events)
    measured: int | None = None
    instance: Instance | None = None
    failed: bool = False
    exit_code: int | None = None
    error: str | None = None
    log_tail: list[str] = field(default_factory=list)
    failures: int = 0
    backoff_until: float = 0.0
    pinned: bool = False
    removed: bool = False
    pending_entry: ModelEntry | None = None  # reload: the entry to restart with
    restart: bool = False  # load again at once after a reload's stop
    loaded_at: float = 0.0
    next_reason: str = "demand"  # why its next load happens (demand, manual, preload, reload)
    after_crash: bool = False  # this run was started because the previous one crashed
    load_seconds: float | None = None
    first_request_measured: bool = False
    prefetch_asked: bool = False
    seen_bytes: int = 0  # the probe's latest reading of this child (fed by the runner)
    stop_waiters: list[int] = field(default_factory=list)  # unload commands awaiting the stop

    @property
    def id(self) -> str:
        return self.entry.id

    @property
    def holds_device(self) -> bool:
        return self.state in HOLDS_DEVICE

    @property
    def loaded(self) -> bool:
        return self.state in LOADED

    @property
    def queued(self) -> int:
        return sum(1 for w in self.queue if w.counts)

    @property
    def need(self) -> int:
        return self.measured or self.estimate

    # read-only views of the current record, for status pages and tests
    @property
    def victim_of(self) -> str | None:
        return self.rec.for_model if isinstance(self.rec, Leaving) else None

    @property
    def stop_reason(self) -> str:
        return self.rec.reason if isinstance(self.rec, Leaving) else ""

    @property
    def drain_deadline(self) -> float | None:
        return self.rec.deadline if isinstance(self.rec, Leaving) else None


def transition(m: Model, new: State, rec: Record = IDLE) -> None:
    """The only way a model changes state: legal by the table, with a fresh record."""
    if new not in TRANSITIONS[m.state]:
        raise IllegalTransition(f"model {m.id}: {m.state.value} -> {new.value} is not a legal transition")
    m.state = new
    m.rec = rec

