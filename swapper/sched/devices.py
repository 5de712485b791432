"""The decision core's devices: one ledger each, and the glue between models and placement.

Mixed into `Core` (pure, like the rest of the core). Every planned device has its own
capacity (budget and reserve), probe reading and room; a model's reservation lies on the
devices of its placement. A single-device node is the case of one device, so nothing changes
for it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

from ..units import format_bytes
from . import ledger, placement
from .errors import InsufficientMemory
from .ledger import Device, Reading
from .lifecycle import STARTING, Model, State

if TYPE_CHECKING:
    from .core import Core


class Devices:
    """Per-device numbers and placement decisions, for `Core`."""

    devices: dict[str, Device]

    # ------------------------------------------------------------------ readings

    @property
    def default(self: Core) -> str:
        return next(iter(self.devices))

    @property
    def reading(self: Core) -> Reading | None:
        """The first device's reading (the only one on a single-device node)."""
        return self.devices[self.default].reading

    @property
    def total(self: Core) -> int:
        return sum(d.total for d in self.devices.values())

    def take(self: Core, reading: Reading | None, readings: dict[str, Reading] | None = None) -> None:
        """Adopt new probe readings: per device, or one reading for the only device."""
        if readings:
            for did, r in readings.items():
                if did in self.devices:
                    self.devices[did].take(r)
        elif reading is not None:
            self.devices[self.default].take(reading)

    # ------------------------------------------------------------------ numbers

    @property
    def capacity(self: Core) -> int:
        return sum(d.capacity for d in self.devices.values())

    def room_on(self: Core, did: str, exclude: Model | None = None) -> int:
        return ledger.room_on(list(self.models.values()), self.devices[did], self.default, self.pid_visible, exclude)

    def room(self: Core, exclude: Model | None = None) -> int:
        return sum(self.room_on(d, exclude) for d in self.devices)

    def used_on(self: Core, did: str) -> int:
        return ledger.used_on(self.models.values(), did, self.default)

    def share(self: Core, m: Model, did: str) -> int:
        return ledger.share(m, did, self.default)

    def devices_of(self: Core, m: Model) -> list[str]:
        return list(m.placement) if m.placement else [self.default]

    # ------------------------------------------------------------------ placement

    def allowed(self: Core, m: Model) -> list[str]:
        """Devices `m` may use: its pinned device, the ones its sleeping engine holds, or all."""
        if m.instance is not None and m.placement:  # asleep: the engine stays on its devices
            return list(m.placement)
        dev = m.entry.device
        if dev:
            return [dev] if dev in self.devices else []
        return list(self.devices)

    def equal_split(self: Core, m: Model) -> bool:
        return m.entry.engine == "vllm"

    def slots_for(self: Core, ids: Iterable[str], exclude: Model) -> list[placement.Slot]:
        return [placement.Slot(d, self.devices[d].index, self.devices[d].capacity, self.room_on(d, exclude),
                               self.devices[d].splittable) for d in ids]

    def holders(self: Core, exclude: Model) -> list[placement.Holder]:
        return [placement.Holder(x.id, {d: self.share(x, d) for d in self.devices_of(x)}, x.last_used, x.inflight,
                                 x.queued, x.pinned)
                for x in self.models.values() if x is not exclude and x.state == State.READY]

    def fits_ever(self: Core, m: Model) -> bool:
        ids = self.allowed(m)
        slots = [placement.Slot(d, self.devices[d].index, self.devices[d].capacity, 0, self.devices[d].splittable)
                 for d in ids]
        return placement.fits_ever(m.need, m.overhead, slots, self.equal_split(m))

    def serial_closed(self: Core, m: Model) -> set[str]:
        """Devices where a start must not overlap another: while the driver hides per-process
        memory (the device's used-memory delta is the measurement) and for engines that size
        themselves from free memory (vLLM)."""
        closed: set[str] = set()
        for x in self.models.values():
            if x is m or x.state not in STARTING:
                continue
            if not self.pid_visible or self.serial_start(m.entry) or self.serial_start(x.entry):
                closed.update(self.devices_of(x))
        return closed

    def place(self: Core, m: Model, closed: set[str], no_evict: set[str],
              include_busy: bool = False, evict: bool = True) -> placement.Plan | None:
        ids = [d for d in self.allowed(m) if d not in closed]
        if not ids:
            return None
        evict_on = set(ids) - no_evict if evict else set()
        if m.instance is not None and m.placement:  # asleep: wakes on the devices it holds
            shares = {d: ledger.share(m, d, self.default, m.need) for d in m.placement}
            return placement.fixed(shares, self.slots_for(ids, m), self.holders(m), slots_needed=self.slots_needed(m),
                                   evict_on=evict_on, include_busy=include_busy)
        return placement.choose(m.need, m.overhead, self.slots_for(ids, m), self.holders(m),
                                slots_needed=self.slots_needed(m), evict_on=evict_on, include_busy=include_busy,
                                equal=self.equal_split(m))

    def spread(self: Core, m: Model, per_device: dict[str, int] | None) -> None:
        """A split child measured on each device: its ledger follows where its memory really is
        (a layer split rarely lands exactly on the planned proportions)."""
        if not per_device or len(m.placement) < 2:
            return
        seen = {d: per_device.get(d, 0) for d in m.placement}
        total = sum(seen.values())
        if total > 0 and all(seen.values()):
            m.placement = {d: b / total for d, b in seen.items()}

    def fits_claim(self: Core, m: Model) -> bool:
        """An admitted model: every one of its devices shows room for its share."""
        return all(self.room_on(d, exclude=m) >= self.share(m, d) for d in self.devices_of(m))

    def too_big(self: Core, m: Model) -> InsufficientMemory:
        ids = self.allowed(m)
        if m.entry.device and m.entry.device not in self.devices:
            return InsufficientMemory(f"model '{m.id}' is pinned to device {m.entry.device}, which is not planned "
                                      f"(planned: {', '.join(self.devices)})")
        if len(self.devices) == 1:
            return InsufficientMemory(
                f"model '{m.id}' needs {format_bytes(m.need)} but the budget holds only "
                f"{format_bytes(self.capacity)} (budget {self.cfg.budget}, device {format_bytes(self.total)}, "
                f"reserve {format_bytes(self.cfg.reserve)})")
        caps = ", ".join(f"{d} {format_bytes(self.devices[d].capacity)}" for d in ids)
        return InsufficientMemory(f"model '{m.id}' needs {format_bytes(m.need)}, more than its devices hold "
                                  f"even split ({format_bytes(m.overhead)} overhead on each): {caps}")
