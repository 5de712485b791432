"""Admission: who is granted, what starts, what is evicted or drained for it, idle TTL.

Part of the decision core (pure; see core.py). `pump()` makes every decision the current state
allows and runs after each event. The rules (README, "Scheduling"):
- a ready model grants its queue first (a freshly loaded model serves what queued for it);
- queued models are considered oldest-waiter first; one that fits starts, one that does not
  claims idle least-recently-used victims (AWAITING_ROOM) and starts once they are stopped
  and the probe shows the memory free;
- a model queued behind a blocked one starts only if it evicts nothing, and only until the
  blocked one has waited `max_wait`; after that, busy victims are drained for it;
- loads are serial while the driver hides per-process memory, and for serial-start engines.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import TYPE_CHECKING

from ..units import format_bytes
from .errors import InsufficientMemory, LoadFailed, SchedulerError
from .events import Fail, Grant, Prefetch, Start, Stop, Wake
from .ledger import host_used, resident_count
from .lifecycle import IDLE, STARTING, AwaitingRoom, Leaving, Model, Record, Starting, State, Waiter, transition
from .planner import Candidate, plan_eviction

if TYPE_CHECKING:
    from .core import Core

log = logging.getLogger("swapper.scheduler")


class Admission:
    """Mixed into `Core`: the decisions that follow from the state after every event."""

    def to(self: Core, m: Model, state: State, rec: Record | None = None) -> None:
        transition(m, state, rec if rec is not None else IDLE)
        self.revision += 1

    def amend(self: Core, m: Model, **changes: object) -> None:
        """Change the current record without a transition (same state, new facts)."""
        m.rec = dataclasses.replace(m.rec, **changes)  # type: ignore[arg-type]
        self.revision += 1

    # ------------------------------------------------------------------ pump

    def pump(self: Core) -> None:
        for _ in range(20):
            before = self.revision
            self._pump_once()
            if self.revision == before:
                return

    def _pump_once(self: Core) -> None:
        now = self.clock()
        for m in list(self.models.values()):
            if m.state == State.READY:
                while m.queue:
                    self.grant(m, m.queue.popleft())
            elif m.state == State.DRAINING and m.inflight == 0:
                self.stop_now(m)
            elif m.state == State.AWAITING_ROOM and not m.queue:
                self.release_claim(m)
            if not m.queue:
                m.prefetch_asked = False
        if self.closing:
            return
        pending = sorted((m for m in self.models.values()
                          if m.queue and m.state in (State.UNLOADED, State.SLEEPING, State.AWAITING_ROOM)),
                         key=lambda m: m.queue[0].enqueued)
        blocked: Model | None = None
        for m in pending:
            if m.state == State.UNLOADED and m.failed and now < m.backoff_until:
                self.fail_queue(m, self.load_failed(m, now))
                continue
            if m.state == State.AWAITING_ROOM:
                self.advance_claim(m, now)
                if m.state == State.AWAITING_ROOM:
                    blocked = blocked or m
                continue
            if blocked is not None:
                if now - blocked.queue[0].enqueued < self.cfg.max_wait:
                    self.admit(m, now, evict=False)
                self.prefetch_waiting(m)
                continue
            if not self.admit(m, now, evict=True):
                blocked = m
                self.prefetch_waiting(m)
                if now - m.queue[0].enqueued >= self.cfg.max_wait:
                    self.drain_for(m, now)

    # ------------------------------------------------------------------ waiters

    def grant(self: Core, m: Model, w: Waiter) -> None:
        now = self.clock()
        if w.counts:
            m.inflight += 1
        m.last_used = now
        assert m.instance is not None
        if w.id >= 0:  # negative ids are the core's own loads (reload restarts): nobody to tell
            self.emit(Grant(w.id, m.id, m.instance, now - w.enqueued, w.counts))

    def fail_queue(self: Core, m: Model, err: SchedulerError) -> None:
        while m.queue:
            self.emit(Fail(m.queue.popleft().id, err))

    def retry_after(self: Core, m: Model) -> float:
        return max(1.0, math.ceil(m.load_seconds or 5.0))

    def load_failed(self: Core, m: Model, now: float) -> LoadFailed:
        tail = "\n".join(m.log_tail[-10:])
        msg = f"model '{m.id}' failed to load: {m.error or 'unknown error'}"
        if tail:
            msg += f"\n--- last log lines ---\n{tail}"
        return LoadFailed(msg, retry_after=max(1.0, math.ceil(m.backoff_until - now)))

    # ------------------------------------------------------------------ admission

    def admit(self: Core, m: Model, now: float, evict: bool) -> bool:
        """Start `m` if it fits (claiming idle victims when allowed). True if it was decided."""
        need = m.need
        if need > self.capacity:
            self.fail_queue(m, InsufficientMemory(
                f"model '{m.id}' needs {format_bytes(need)} but the budget holds only {format_bytes(self.capacity)}"))
            return True
        if self.serial_blocked(m):
            return False
        slots = self.slots_needed(m)
        room = self.room(exclude=m)
        if room >= need and slots == 0:
            self.start(m, now)
            return True
        if not evict:
            return False
        victims = plan_eviction(max(0, need - room), slots, self.candidates(exclude=m))
        if victims is None:
            return False
        log.info("evicting %s to fit %s (%s)", ", ".join(victims), m.id, format_bytes(need))
        self.claim(m, need, victims, now)
        self.advance_claim(m, now)
        return True

    def serial_blocked(self: Core, m: Model) -> bool:
        """Loads wait for each other while the driver hides per-process memory (the device's
        used-memory delta is the measurement) and for engines that size themselves from free
        memory (vLLM)."""
        starting = [x for x in self.models.values() if x is not m and x.state in STARTING]
        if not starting:
            return False
        if not self.pid_visible or self.serial_start(m.entry):
            return True
        return any(self.serial_start(x.entry) for x in starting)

    def slots_needed(self: Core, m: Model) -> int:
        if not self.cfg.max_models:
            return 0
        return max(0, resident_count(self.models.values(), exclude=m) + 1 - self.cfg.max_models)

    def candidates(self: Core, exclude: Model) -> list[Candidate]:
        return [Candidate(x.id, x.reserved, x.last_used, x.inflight, x.queued, x.pinned)
                for x in self.models.values() if x is not exclude and x.state == State.READY]

    def claim(self: Core, m: Model, need: int, victims: list[str], now: float) -> None:
        """Admit `m` behind its victims: hold its reservation while they drain and stop."""
        self.to(m, State.AWAITING_ROOM, AwaitingRoom(now, from_sleep=m.instance is not None))
        m.reserved = need
        for vid in victims:
            self.begin_stop(self.models[vid], "budget", for_model=m.id)
        self.prefetch(m)

    def advance_claim(self: Core, m: Model, now: float) -> None:
        """An admitted model whose victims are stopping: start once memory shows free."""
        if any(x.victim_of == m.id for x in self.models.values()):
            return  # a victim still drains or stops (a crashed one no longer names m)
        if self.serial_blocked(m):
            return
        if self.room(exclude=m) >= m.reserved and self.slots_needed(m) == 0:
            self.start(m, now)
            return
        assert isinstance(m.rec, AwaitingRoom)
        if now - m.rec.since < self.cfg.settle:
            return  # the device may lag behind the stop for a moment
        self.release_claim(m)  # memory taken by someone else meanwhile: plan again
        self.admit(m, now, evict=True)

    def release_claim(self: Core, m: Model) -> None:
        self.to(m, State.UNLOADED if m.instance is None else State.SLEEPING)
        m.reserved = 0
        for x in self.models.values():
            if x.victim_of == m.id and x.state == State.DRAINING and x.stop_reason == "budget":
                self.to(x, State.READY)  # its drain was only for m

    def drain_for(self: Core, m: Model, now: float) -> None:
        """`m` has waited past max_wait: drain busy models (LRU) so it loads next."""
        if any(x.victim_of == m.id for x in self.models.values()):
            return
        victims = plan_eviction(max(0, m.need - self.room(exclude=m)), self.slots_needed(m),
                                self.candidates(exclude=m), include_busy=True)
        if not victims:
            return
        log.info("%s waited %.0fs: draining %s for it", m.id, self.cfg.max_wait, ", ".join(victims))
        self.claim(m, m.need, victims, now)

    def prefetch_waiting(self: Core, m: Model) -> None:
        if m.state == State.UNLOADED and not m.prefetch_asked:
            m.prefetch_asked = True
            self.prefetch(m)

    def prefetch(self: Core, m: Model) -> None:
        if self.cfg.prefetch:
            self.emit(Prefetch(m.entry))

    def start(self: Core, m: Model, now: float) -> None:
        since = m.rec.since if isinstance(m.rec, AwaitingRoom) else now
        reason, m.next_reason = m.next_reason, "demand"
        m.reserved = m.need
        m.prefetch_asked = False
        if m.instance is not None:  # asleep: wake it
            m.host_reserved = 0
            self.to(m, State.WAKING, Starting(since, reason))
            self.emit(Wake(m.id, m.instance, m.entry))
            return
        self.to(m, State.LOADING, Starting(since, reason))
        self.emit(Start(m.id, m.entry, m.reserved, measure_device=not self.pid_visible))

    # ------------------------------------------------------------------ stopping

    def begin_stop(self: Core, m: Model, reason: str, for_model: str | None = None,
                   deadline: float | None = None) -> None:
        now = self.clock()
        if m.state == State.SLEEPING:
            self.to(m, State.STOPPING, Leaving(reason, State.UNLOADED, for_model, since=now))
            self.emit(Stop(m.id, m.instance, m.entry, sleep=False))
            return
        if m.state not in (State.READY, State.DRAINING):
            return
        if m.inflight > 0:  # never killed under a stream: drain first
            if deadline is None and reason in ("shutdown", "manual", "reload", "removed"):
                deadline = now + self.cfg.drain_timeout
            rec = Leaving(reason, State.UNLOADED, for_model, deadline, now)
            if m.state == State.DRAINING:
                self.amend(m, **{f.name: getattr(rec, f.name) for f in dataclasses.fields(rec)})
            else:
                self.to(m, State.DRAINING, rec)
            return
        self.stop_now(m, Leaving(reason, State.UNLOADED, for_model, since=now))

    def stop_now(self: Core, m: Model, rec: Leaving | None = None) -> None:
        if m.state not in (State.READY, State.DRAINING):
            return
        rec = rec or (m.rec if isinstance(m.rec, Leaving) else Leaving("manual"))
        sleep = (m.entry.sleep and rec.reason in ("budget", "ttl") and not m.removed
                 and m.pending_entry is None and self.can_sleep(m.entry))
        rec = dataclasses.replace(rec, target=State.SLEEPING if sleep else State.UNLOADED, since=self.clock(),
                                  deadline=None)
        self.to(m, State.STOPPING, rec)
        self.emit(Stop(m.id, m.instance, m.entry, sleep=sleep))

    def fit_host_budget(self: Core) -> None:
        """Too many sleepers for host RAM: stop the least recently used ones for real."""
        sleepers = sorted((x for x in self.models.values() if x.state == State.SLEEPING), key=lambda x: x.last_used)
        used = host_used(self.models.values())
        for x in sleepers:
            if used <= self.host_capacity:
                break
            used -= x.host_reserved
            self.begin_stop(x, "budget")

    def ttl(self: Core, now: float) -> None:
        for m in list(self.models.values()):
            ttl = m.entry.idle_ttl if m.entry.idle_ttl is not None else self.cfg.idle_ttl
            if not ttl or m.pinned or m.state != State.READY or m.inflight or m.queue:
                continue
            if now - m.last_used < ttl:
                continue
            if sum(1 for x in self.models.values() if x.state in (State.READY, State.LOADING)) <= 1:
                return  # never unload the last resident model: the node would go unready
            log.info("model %s idle for %.0fs (ttl %gs): unloading", m.id, now - m.last_used, ttl)
            self.begin_stop(m, "ttl")

