"""Which resident models to evict so that another fits: a pure function of their numbers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable


@dataclass(frozen=True)
class Candidate:
    """What `plan_eviction` needs to know of a resident (ready) model."""

    id: str
    bytes: int
    last_used: float
    inflight: int = 0
    queued: int = 0
    pinned: bool = False


def plan_eviction(need_bytes: int, need_slots: int, candidates: Iterable[Candidate],
                  include_busy: bool = False) -> list[str] | None:
    """Victims that free `need_bytes` and `need_slots`, least recently used first.

    Only unpinned models with nothing queued are candidates; busy ones only when
    `include_busy` (they will be drained, never killed). Victims that turn out unnecessary once
    a later (larger) one is chosen are dropped again. None when no choice suffices.
    """
    eligible = sorted(
        (c for c in candidates if not c.pinned and c.queued == 0 and (include_busy or c.inflight == 0)),
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
