"""Fakes for driving the scheduler synchronously: clock, launcher, estimator (no processes).

The fake launcher "allocates" each child's footprint on a FakeProbe under a fake PID, so the
scheduler's probe checks see memory come and go exactly as they would on a device. Starts can
complete at once (`auto=True`) or wait for the test to `finish()` them, so intermediate states
are observable. Nothing here sleeps: `spin()` yields to the event loop until nothing can move (`quiesce`).
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field
from typing import Callable

from swapper.catalog import Catalog, ModelEntry
from swapper.estimate import Estimate
from swapper.gpu import FakeProbe
from swapper.scheduler import LoadError, Scheduler, SchedulerConfig
from swapper.units import SizeSpec

MiB = 1 << 20
_pids = itertools.count(1000)


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


async def quiesce(limit: int = 100_000) -> None:
    """Return once nothing can move: every other task waits on something no callback will set
    this turn (a launcher gate, a held stream, a future the test resolves). This is a condition,
    not a count of event-loop turns: it reads the loop's ready queue (`_ready`, an asyncio
    implementation detail; nothing public says "idle"), and fails rather than spin forever."""
    loop = asyncio.get_running_loop()
    for _ in range(limit):
        await asyncio.sleep(0)
        if not loop._ready:  # type: ignore[attr-defined]
            return
    raise AssertionError("the fake world never came to rest")


@dataclass
class FakeInstance:
    model: str
    pid: int = field(default_factory=lambda: next(_pids))
    base_url: str = "http://fake"
    alive: bool = True

    def pids(self) -> list[int]:
        return [self.pid] if self.alive else []


@dataclass
class FakeLauncher:
    probe: FakeProbe
    footprints: dict[str, int] = field(default_factory=dict)  # what a child really takes
    auto: bool = True
    fail: set[str] = field(default_factory=set)
    sleepable: set[str] = field(default_factory=set)
    starts: list[str] = field(default_factory=list)
    stops: list[str] = field(default_factory=list)
    sleeps: list[str] = field(default_factory=list)
    wakes: list[str] = field(default_factory=list)
    prefetched: list[str] = field(default_factory=list)
    gates: dict[str, asyncio.Future] = field(default_factory=dict)
    exits: dict[str, Callable[[int | None], None]] = field(default_factory=dict)
    instances: dict[str, FakeInstance] = field(default_factory=dict)
    devices: dict[str, FakeProbe] = field(default_factory=dict)  # several devices: id -> probe
    placements: dict[str, dict[str, float]] = field(default_factory=dict)  # the last start's placement

    def _probes(self, model: str) -> list[tuple[FakeProbe, float]]:
        """Where a child's memory lies: its placement's devices, in its proportions."""
        place = self.placements.get(model)
        if not self.devices or not place:
            return [(self.probe, 1.0)]
        return [(self.devices[d], f) for d, f in place.items()]

    def _hold(self, model: str, pid: int, nbytes: int) -> None:
        for probe, frac in self._probes(model):
            probe.per_pid[pid] = int(nbytes * frac)

    def _drop(self, model: str, pid: int) -> None:
        for probe, _ in self._probes(model):
            probe.per_pid.pop(pid, None)

    async def start(self, entry: ModelEntry, reserved: int, on_exit: Callable[[int | None], None], *,
                    placement: dict[str, float] | None = None) -> FakeInstance:
        self.starts.append(entry.id)
        self.placements[entry.id] = dict(placement or {})
        if not self.auto:
            gate = self.gates[entry.id] = asyncio.get_running_loop().create_future()
            await gate
        if entry.id in self.fail:
            raise LoadError("boom", exit_code=1, log_tail=["error: cannot load model"])
        inst = FakeInstance(entry.id, next(_pids))
        self._hold(entry.id, inst.pid, self.footprints.get(entry.id, reserved))
        self.exits[entry.id] = on_exit
        self.instances[entry.id] = inst
        return inst

    def finish(self, model: str) -> None:
        self.gates.pop(model).set_result(None)

    async def stop(self, instance: FakeInstance, entry: ModelEntry) -> None:
        self.stops.append(entry.id)
        instance.alive = False
        self._drop(entry.id, instance.pid)

    def crash(self, model: str, code: int = 137) -> None:
        inst = self.instances[model]
        inst.alive = False
        self._drop(model, inst.pid)
        self.exits[model](code)

    def can_sleep(self, entry: ModelEntry) -> bool:
        return entry.id in self.sleepable

    async def sleep(self, instance: FakeInstance, entry: ModelEntry) -> None:
        self.sleeps.append(entry.id)
        self._hold(entry.id, instance.pid, 0)  # device memory released, process alive

    async def wake(self, instance: FakeInstance, entry: ModelEntry) -> None:
        self.wakes.append(entry.id)
        self._hold(entry.id, instance.pid, self.footprints.get(entry.id, 0))

    def prefetch(self, entry: ModelEntry) -> None:
        self.prefetched.append(entry.id)


class FakeEstimator:
    """Declared sizes; learning is recorded so tests can check it."""

    def __init__(self, sizes: dict[str, int]):
        self.sizes = sizes
        self.learned: dict[str, int] = {}

    def estimate(self, entry: ModelEntry) -> Estimate:
        b = self.learned.get(entry.id, self.sizes[entry.id])
        return Estimate(b, b, 0, 0, self.learned.get(entry.id), "estimate")

    def peek(self, entry: ModelEntry) -> Estimate:
        return self.estimate(entry)

    def learn(self, entry: ModelEntry, measured: int) -> None:
        self.learned[entry.id] = measured


def entry(name: str, pinned: bool = False, idle_ttl: float | None = None, sleep: bool = False) -> ModelEntry:
    return ModelEntry(id=name, name=name, engine="llamacpp", path=None, source="config", pinned=pinned,
                      idle_ttl=idle_ttl, sleep=sleep)


@dataclass
class World:
    sched: Scheduler
    launcher: FakeLauncher
    probe: FakeProbe
    clock: FakeClock
    est: FakeEstimator

    async def spin(self) -> None:
        await quiesce()

    def state(self, name: str) -> str:
        return self.sched.models[name].state.value

    def resident(self) -> set[str]:
        return {m.id for m in self.sched.models.values() if m.state.public == "loaded"}


def world(sizes: dict[str, int], capacity: int, *, total: int = 64 << 30, pinned: set[str] = frozenset(),
          ttl: dict[str, float] | None = None, sleepable: set[str] = frozenset(), auto: bool = True,
          visible: bool = True, **cfg: object) -> World:
    probe = FakeProbe(total=total, visible=visible)
    clock = FakeClock()
    launcher = FakeLauncher(probe, footprints=dict(sizes), auto=auto, sleepable=set(sleepable))
    est = FakeEstimator(dict(sizes))
    cat = Catalog([entry(n, pinned=n in pinned, idle_ttl=(ttl or {}).get(n), sleep=n in sleepable) for n in sizes])
    config = SchedulerConfig(budget=SizeSpec(bytes=capacity), reserve=0, backoff_base=1.0, **cfg)  # type: ignore[arg-type]
    sched = Scheduler(cat, probe, launcher, est, config, clock=clock, wall=clock)
    return World(sched, launcher, probe, clock, est)


@dataclass
class Node:
    """A scheduler planning several fake devices (a multi-GPU node)."""

    sched: Scheduler
    launcher: FakeLauncher
    devices: dict[str, FakeProbe]
    clock: FakeClock
    est: FakeEstimator

    async def spin(self) -> None:
        await quiesce()

    def used(self) -> dict[str, int]:
        return {d: p.memory().used for d, p in self.devices.items()}


def node(n: int, sizes: dict[str, int], budget: int, *, total: int = 24 << 30, device: dict[str, str] | None = None,
         pinned: set[str] = frozenset(), vllm: set[str] = frozenset(), **cfg: object) -> Node:
    """`n` fake devices of `total` bytes, each planned with `budget`; models placed or pinned
    (`vllm`: models on the engine that splits in equal shares)."""
    import dataclasses

    probes = [FakeProbe(total=total, index=i, name=f"fake GPU {i}") for i in range(n)]
    devices = {f"fake:{i}": p for i, p in enumerate(probes)}
    clock = FakeClock()
    launcher = FakeLauncher(probes[0], footprints=dict(sizes), devices=devices)
    est = FakeEstimator(dict(sizes))
    cat = Catalog([dataclasses.replace(entry(m, pinned=m in pinned), device=(device or {}).get(m),
                                       engine="vllm" if m in vllm else "llamacpp") for m in sizes])
    config = SchedulerConfig(budget=SizeSpec(bytes=budget), reserve=0, **cfg)  # type: ignore[arg-type]
    sched = Scheduler(cat, probes, launcher, est, config, clock=clock, wall=clock)
    return Node(sched, launcher, devices, clock, est)
