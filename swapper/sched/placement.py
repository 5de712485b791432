"""Placement: the device(s) a model loads on and what is evicted there. A pure function.

The rule (README, "Several GPUs"):
1. Where it may go: the device named in its entry (`device: nvidia:1`), the devices its
   sleeping engine already holds, otherwise every planned device not closed to it (a device
   whose blocked claimant waited past `max_wait`, or one where a start must not overlap).
2. A model that fits one device's capacity goes to one device: the one that needs the fewest
   evictions, then the best fit (least room left over once it is placed), then the lowest
   index. Page-cache warmth does not enter the rule: the page cache is the host's, shared by
   every device, so a warm file is warm for all of them.
3. A model larger than every single device is split over the fewest devices that can hold it.
   Each device holds its share of the weights and KV cache plus the per-process overhead
   (every device a child touches gets its own context and buffers). Layer split (llama.cpp):
   shares in proportion to each device's room — the room it has now if that suffices,
   otherwise the room it would have after evicting its idle models. Equal split (vLLM's tensor
   parallelism): a power-of-two number of devices, each with room for an equal share.
Eviction is per device: victims are planned on each chosen device from the models holding
memory there (least recently used first, never busy, pinned or queued ones unless draining).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable

from .planner import Candidate, plan_eviction


@dataclass(frozen=True)
class Slot:
    """A device as placement sees it: how much it may ever hold, and holds free now."""

    id: str
    index: int
    capacity: int
    room: int
    splittable: bool = True  # a MIG instance cannot be combined with another device


@dataclass(frozen=True)
class Holder:
    """A resident model that could be evicted: its bytes on each device."""

    id: str
    shares: dict[str, int]
    last_used: float
    inflight: int = 0
    queued: int = 0
    pinned: bool = False


@dataclass(frozen=True)
class Plan:
    shares: dict[str, int]  # device id -> bytes
    victims: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.shares.values())

    @property
    def fractions(self) -> dict[str, float]:
        t = self.total
        return {d: (b / t if t else 1.0 / len(self.shares)) for d, b in self.shares.items()}


def _candidates(dev: str, holders: Iterable[Holder], skip: set[str]) -> list[Candidate]:
    return [Candidate(h.id, h.shares[dev], h.last_used, h.inflight, h.queued, h.pinned)
            for h in holders if h.shares.get(dev) and h.id not in skip]


def _freed(dev: str, holders: list[Holder], ids: Iterable[str]) -> int:
    ids = set(ids)
    return sum(h.shares.get(dev, 0) for h in holders if h.id in ids)


def _evictable(h: Holder, include_busy: bool) -> bool:
    return not h.pinned and h.queued == 0 and (include_busy or h.inflight == 0)


def fits_ever(need: int, overhead: int, slots: list[Slot], equal: bool) -> bool:
    """Whether the model could load at all on these devices, if they were empty."""
    if any(s.capacity >= need for s in slots):
        return True
    return _split_devices(need, overhead, [s for s in slots if s.splittable], equal, lambda s: s.capacity) is not None


def choose(need: int, overhead: int, slots: list[Slot], holders: list[Holder], *, slots_needed: int = 0,
           evict_on: set[str] | None = None, include_busy: bool = False, equal: bool = False) -> Plan | None:
    """Where `need` bytes go, and the victims that make room; None when nothing works now.

    `slots` are the devices the model may use; `evict_on` the ones where evicting is allowed
    (None: all of them)."""
    allowed_evict = {s.id for s in slots} if evict_on is None else evict_on
    single = [s for s in slots if s.capacity >= need]
    if single:
        best: tuple[tuple[int, int, int], Plan] | None = None
        for s in single:
            plan = _on_one(need, s, holders, slots_needed, s.id in allowed_evict, include_busy)
            if plan is None:
                continue
            left = s.room + _freed(s.id, holders, plan.victims) - need
            key = (len(plan.victims), left, s.index)
            if best is None or key < best[0]:
                best = (key, plan)
        return best[1] if best else None
    return _split(need, overhead, [s for s in slots if s.splittable], holders, slots_needed, allowed_evict,
                  include_busy, equal)


def _on_one(need: int, s: Slot, holders: list[Holder], slots_needed: int, may_evict: bool,
            include_busy: bool) -> Plan | None:
    if s.room >= need and slots_needed == 0:
        return Plan({s.id: need})
    if not may_evict:
        return None
    victims = plan_eviction(max(0, need - s.room), slots_needed, _candidates(s.id, holders, set()), include_busy)
    return None if victims is None else Plan({s.id: need}, victims)


def _split_devices(need: int, overhead: int, slots: list[Slot], equal: bool,
                   size: Callable[[Slot], int]) -> list[Slot] | None:
    """The fewest devices whose `size` holds the model split (largest first), or None."""
    work = max(0, need - overhead)
    ranked = sorted(slots, key=lambda s: (-size(s), s.index))
    counts = [k for k in range(2, len(ranked) + 1) if not equal or k & (k - 1) == 0]
    for k in counts:
        chosen = ranked[:k]
        if equal:
            if min(size(s) for s in chosen) >= overhead + math.ceil(work / k):
                return chosen
        elif sum(max(0, size(s) - overhead) for s in chosen) >= work:
            return chosen
    return None


def _split(need: int, overhead: int, slots: list[Slot], holders: list[Holder], slots_needed: int,
           evict_on: set[str], include_busy: bool, equal: bool) -> Plan | None:
    work = max(0, need - overhead)

    def reachable(s: Slot) -> int:  # room after evicting everything evictable on it
        if s.id not in evict_on:
            return s.room
        return s.room + sum(h.shares.get(s.id, 0) for h in holders if _evictable(h, include_busy))

    for size in (lambda s: s.room, reachable):  # without evictions if that works, then with them
        chosen = _split_devices(need, overhead, slots, equal, size)
        if chosen is None:
            continue
        if equal:
            share = overhead + math.ceil(work / len(chosen))
            shares = {s.id: share for s in chosen}
        else:
            weights = {s.id: max(0, size(s) - overhead) for s in chosen}
            total = sum(weights.values()) or 1
            parts = {d: work * w // total for d, w in weights.items()}
            for d in list(parts)[:work - sum(parts.values())]:  # rounding remainder, a byte each
                parts[d] += 1
            shares = {d: overhead + p for d, p in parts.items()}
        victims = _evict_for(shares, chosen, holders, slots_needed, evict_on, include_busy)
        if victims is not None:
            return Plan(shares, victims)
    return None


def fixed(shares: dict[str, int], slots: list[Slot], holders: list[Holder], *, slots_needed: int = 0,
          evict_on: set[str] | None = None, include_busy: bool = False) -> Plan | None:
    """Room for given shares on given devices (a sleeping engine wakes where it sleeps)."""
    evict_on = {s.id for s in slots} if evict_on is None else evict_on
    by_id = {s.id: s for s in slots}
    if set(shares) - set(by_id):
        return None
    victims = _evict_for(shares, [by_id[d] for d in shares], holders, slots_needed, evict_on, include_busy)
    return None if victims is None else Plan(dict(shares), victims)


def _evict_for(shares: dict[str, int], chosen: list[Slot], holders: list[Holder], slots_needed: int,
               evict_on: set[str], include_busy: bool) -> list[str] | None:
    """Victims on each device so that its share fits (a split victim frees on all its devices)."""
    victims: list[str] = []
    for i, s in enumerate(chosen):
        short = shares[s.id] - s.room - _freed(s.id, holders, victims)
        want_slots = slots_needed if i == 0 else 0
        if short <= 0 and want_slots == 0:
            continue
        if s.id not in evict_on:
            return None
        more = plan_eviction(max(0, short), want_slots, _candidates(s.id, holders, set(victims)), include_busy)
        if more is None:
            return None
        victims += more
    return victims
