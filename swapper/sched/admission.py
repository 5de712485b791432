"""Admission: who is granted, what starts, what is evicted or drained for it, idle TTL.

Part of the decision core (pure; see core.py). `pump()` makes every decision the current state
allows and runs after each event. The rules (README, "Scheduling"):
- a ready model grants its queue first (a freshly loaded model serves what queued for it);
- queued models are considered oldest-waiter first; one that fits starts, one that does not
  claims idle least-recently-used victims (AWAITING_ROOM) and starts once they are stopped
  and the probe shows the memory free;
- a model queued behind a blocked one starts only if it evicts nothing on the blocked one's
  devices, and only until the blocked one has waited `max_wait`; after that, busy victims on its
  devices are drained for it (other devices go on as before: blocking is per device);
- where a model goes (one device, or several for a split) is `placement.py`'s rule;
- loads are serial (per device) while the driver hides per-process memory, and for serial-start
  engines.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import TYPE_CHECKING

from ..units import format_bytes
from .errors import LoadFailed, SchedulerError
from .events import Fail, Grant, Prefetch, Start, Stop, Wake
from .ledger import host_used, resident_count
from .lifecycle import IDLE, AwaitingRoom, Leaving, Model, Record, Starting, State, Waiter, transition
from .placement import Plan

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
        blocked: dict[str, Model] = {}  # device -> the first model that waits for room there
        for m in pending:
            if m.state == State.UNLOADED and m.failed and now < m.backoff_until:
                self.fail_queue(m, self.load_failed(m, now))
                continue
            if m.state == State.AWAITING_ROOM:
                self.advance_claim(m, now)
                if m.state == State.AWAITING_ROOM:
                    for d in self.devices_of(m):
                        blocked.setdefault(d, m)
                continue
            # behind a blocked model, a device takes only loads that evict nothing there, and
            # none at all once that model has waited max_wait; other devices are not affected
            closed = {d for d, b in blocked.items() if now - b.queue[0].enqueued >= self.cfg.max_wait}
            if self.admit(m, now, closed=closed, no_evict=set(blocked)):
                continue
            self.prefetch_waiting(m)
            # it waits for the devices it would get by draining busy models: those alone are
            # held for it; loads elsewhere go on
            target = self.place(m, closed, set(), include_busy=True)
            free = [d for d in (target.shares if target else self.allowed(m)) if d not in blocked]
            if not free:
                continue
            for d in free:
                blocked[d] = m
            if now - m.queue[0].enqueued >= self.cfg.max_wait:
                self.drain_for(m, now, closed=set(self.devices) - set(free))

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

    def admit(self: Core, m: Model, now: float, closed: set[str] | None = None,
              no_evict: set[str] | None = None) -> bool:
        """Start `m` where placement puts it (claiming idle victims there). True if decided.

        `closed`: devices it may not use now; `no_evict`: devices where it may not evict."""
        if not self.fits_ever(m):
            self.fail_queue(m, self.too_big(m))
            return True
        plan = self.place(m, (closed or set()) | self.serial_closed(m), no_evict or set())
        if plan is None:
            return False
        if not plan.victims:
            self.start(m, now, plan)
            return True
        log.info("evicting %s to fit %s (%s on %s)", ", ".join(plan.victims), m.id, format_bytes(plan.total),
                 ", ".join(plan.shares))
        self.claim(m, plan, now)
        self.advance_claim(m, now)
        return True

    def slots_needed(self: Core, m: Model) -> int:
        if not self.cfg.max_models:
            return 0
        return max(0, resident_count(self.models.values(), exclude=m) + 1 - self.cfg.max_models)

    def claim(self: Core, m: Model, plan: Plan, now: float) -> None:
        """Admit `m` behind its victims: hold its reservation while they drain and stop."""
        self.to(m, State.AWAITING_ROOM, AwaitingRoom(now, from_sleep=m.instance is not None))
        m.reserved, m.placement = plan.total, plan.fractions
        for vid in plan.victims:
            self.begin_stop(self.models[vid], "budget", for_model=m.id)
        self.prefetch(m)

    def advance_claim(self: Core, m: Model, now: float) -> None:
        """An admitted model whose victims are stopping: start once memory shows free."""
        if any(x.victim_of == m.id for x in self.models.values()):
            return  # a victim still drains or stops (a crashed one no longer names m)
        if set(self.devices_of(m)) & self.serial_closed(m):
            return
        if self.fits_claim(m) and self.slots_needed(m) == 0:
            self.start(m, now)
            return
        assert isinstance(m.rec, AwaitingRoom)
        if now - m.rec.since < self.cfg.settle:
            return  # the device may lag behind the stop for a moment
        self.release_claim(m)  # memory taken by someone else meanwhile: plan again
        self.admit(m, now)

    def release_claim(self: Core, m: Model) -> None:
        self.to(m, State.UNLOADED if m.instance is None else State.SLEEPING)
        m.reserved = 0
        for x in self.models.values():
            if x.victim_of == m.id and x.state == State.DRAINING and x.stop_reason == "budget":
                self.to(x, State.READY)  # its drain was only for m

    def drain_for(self: Core, m: Model, now: float, closed: set[str] | None = None) -> None:
        """`m` has waited past max_wait: drain busy models (LRU) on its devices so it loads next."""
        if any(x.victim_of == m.id for x in self.models.values()):
            return
        plan = self.place(m, (closed or set()) | self.serial_closed(m), set(), include_busy=True)
        if plan is None or not plan.victims:
            return
        log.info("%s waited %.0fs: draining %s for it", m.id, self.cfg.max_wait, ", ".join(plan.victims))
        self.claim(m, plan, now)

    def prefetch_waiting(self: Core, m: Model) -> None:
        if m.state == State.UNLOADED and not m.prefetch_asked:
            m.prefetch_asked = True
            self.prefetch(m)

    def prefetch(self: Core, m: Model) -> None:
        if self.cfg.prefetch:
            self.emit(Prefetch(m.entry))

    def start(self: Core, m: Model, now: float, plan: Plan | None = None) -> None:
        """Start (or wake) `m` on its placement: `plan`, or the one its claim holds."""
        since = m.rec.since if isinstance(m.rec, AwaitingRoom) else now
        reason, m.next_reason = m.next_reason, "demand"
        if plan is not None:
            m.reserved, m.placement = plan.total, plan.fractions
        m.prefetch_asked = False
        if m.instance is not None:  # asleep: wake it
            m.host_reserved = 0
            self.to(m, State.WAKING, Starting(since, reason))
            self.emit(Wake(m.id, m.instance, m.entry))
            return
        self.to(m, State.LOADING, Starting(since, reason))
        self.emit(Start(m.id, m.entry, m.reserved, measure_device=not self.pid_visible, placement=dict(m.placement)))

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

