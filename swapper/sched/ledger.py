"""The budget ledger: capacity, what is reserved, and the room a load may use. Pure numbers.

Capacity is min(budget, device total - reserve): the reserve protects the device, not the
budget, so `--budget 450MiB` plans with 450 MiB. Room is the smaller of what the ledger leaves
and what the latest probe reading shows free (other processes use the device too), minus what
starting children will take that the reading does not show yet.

On a node with several devices each has its own capacity, reading and room (`Device`); a
model's reservation is spread over its devices by its placement (`share`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from ..units import SizeSpec
from .lifecycle import COUNTS_RESIDENT, Model, State


@dataclass(frozen=True)
class Reading:
    """One probe reading of the device, taken by the effects runner."""

    total: int
    used: int
    free: int


@dataclass
class Device:
    """One planned device: its own budget, reserve and latest reading."""

    id: str
    budget: SizeSpec
    reserve: int = 0
    reading: Reading | None = None
    index: int = 0
    total: int = 0
    uuid: str | None = None
    splittable: bool = True  # False for a MIG instance: a process sees one MIG device at most

    def __post_init__(self) -> None:
        if not self.total and self.reading is not None:
            self.total = self.reading.total

    def take(self, reading: Reading) -> None:
        self.reading = reading
        if reading.total:
            self.total = reading.total

    @property
    def capacity(self) -> int:
        return capacity(self.budget, self.reserve, self.total)


def share(m: Model, dev: str, default: str, nbytes: int | None = None) -> int:
    """Bytes of `m`'s reservation (or of `nbytes`) that lie on device `dev`."""
    nbytes = m.reserved if nbytes is None else nbytes
    if not m.placement:
        return nbytes if dev == default else 0
    frac = m.placement.get(dev, 0.0)
    return nbytes if frac == 1.0 else round(nbytes * frac)


def used_on(models: Iterable[Model], dev: str, default: str, exclude: Model | None = None) -> int:
    return sum(share(m, dev, default) for m in models if m.holds_device and m is not exclude)


def room_on(models: list[Model], d: Device, default: str, pid_visible: bool | None,
            exclude: Model | None = None) -> int:
    """Free bytes on one device: the smaller of what its ledger and its reading allow."""
    ledger_free = d.capacity - used_on(models, d.id, default, exclude)
    if d.reading is None:
        return ledger_free
    pending = sum(share(m, d.id, default, unreflected(m, pid_visible)) for m in models
                  if m is not exclude and m.state in (State.AWAITING_ROOM, State.LOADING, State.WAKING))
    return min(ledger_free, d.reading.free - d.reserve - pending)


def capacity(budget: SizeSpec, reserve: int, total: int) -> int:
    """Bytes the ledger may plan with."""
    if total <= 0:  # device size unknown: an absolute budget is all there is to go on
        return max(0, budget.resolve(0))
    return max(0, min(budget.resolve(total), total - reserve))


def used(models: Iterable[Model], exclude: Model | None = None) -> int:
    return sum(m.reserved for m in models if m.holds_device and m is not exclude)


def host_used(models: Iterable[Model]) -> int:
    return sum(m.host_reserved for m in models if m.state == State.SLEEPING)


def resident_count(models: Iterable[Model], exclude: Model | None = None) -> int:
    return sum(1 for m in models if m.state in COUNTS_RESIDENT and m is not exclude)


def unreflected(m: Model, pid_visible: bool | None) -> int:
    """Bytes a starting model will take that the latest reading does not show yet."""
    if m.state == State.AWAITING_ROOM:
        return m.reserved
    if pid_visible and m.instance is not None:
        return max(0, m.reserved - m.seen_bytes)
    return m.reserved
