"""Several devices, as a specification of the decision core: placement, per-device eviction,
splits, pins, and devices that do not wait for each other. Synchronous: events in, effects out.

The fake node keeps one "device" per planned GPU whose used memory is what the ledger placed
there, the way a probe would read it after each start and stop.
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest

from schedfakes import FakeClock, FakeInstance, entry
from swapper.sched import Core, SchedulerConfig, State
from swapper.sched import errors as err
from swapper.sched import events as E
from swapper.sched.ledger import Device, Reading
from swapper.units import SizeSpec

GiB = 1 << 30


class Node:
    """A core planning `n` devices of `total` bytes, each with a budget of `cap` (or its own)."""

    def __init__(self, n: int, sizes: dict[str, int], cap: int = 20 * GiB, *, total: int = 24 * GiB,
                 caps: dict[int, int] | None = None, pinned: set[str] = frozenset(),
                 device: dict[str, str] | None = None, vllm: set[str] = frozenset(), overhead: int = 0,
                 sleepable: set[str] = frozenset(), **cfg: object):
        self.clock = FakeClock()
        self.sizes = sizes
        self.total = total
        self.overhead = overhead
        devs = [Device(f"gpu:{i}", SizeSpec(bytes=(caps or {}).get(i, cap)), 0, Reading(total, 0, total), index=i)
                for i in range(n)]
        config = SchedulerConfig(budget=SizeSpec(bytes=cap), reserve=0, **cfg)  # type: ignore[arg-type]
        self.core = Core(config, self.clock, None, host_capacity=64 * GiB, pid_visible=True, devices=devs,
                         can_sleep=lambda e: e.id in sleepable)
        self.starts: list[E.Start] = []
        self.entries = {}
        for name in sizes:
            e = entry(name, pinned=name in pinned, sleep=name in sleepable)
            self.entries[name] = dataclasses.replace(e, device=(device or {}).get(name),
                                                     engine="vllm" if name in vllm else "llamacpp")
        self.send(E.CatalogChanged(list(self.entries.values())))
        self.ids = itertools.count(1)

    def send(self, ev: E.Event) -> list[E.Effect]:
        effs = self.core.handle(ev)
        self.starts += [e for e in effs if isinstance(e, E.Start)]
        return effs

    def readings(self) -> dict[str, Reading]:
        """What a probe shows: every child holding memory, by its share on each device."""
        out = {}
        for d in self.core.devices:
            used = sum(self.core.share(m, d) for m in self.core.models.values()
                       if m.state in (State.READY, State.DRAINING, State.STOPPING))
            out[d] = Reading(self.total, used, self.total - used)
        return out

    def arrive(self, name: str, **kw: object) -> tuple[int, list[E.Effect]]:
        wid = next(self.ids)
        return wid, self.send(E.Arrived(wid, name, self.sizes[name], overhead=self.overhead, **kw))  # type: ignore[arg-type]

    def loaded(self, name: str, per_device: dict[str, int] | None = None) -> list[E.Effect]:
        m = self.core.models[name]
        total = sum(per_device.values()) if per_device else m.reserved
        return self.send(E.Loaded(name, FakeInstance(name), 1.0, total, readings=self.readings(), per_device=per_device))

    def stopped(self, name: str) -> list[E.Effect]:
        m = self.core.models[name]
        ev = E.Stopped(name, slept=m.rec.target == State.SLEEPING, seconds=0.1)  # type: ignore[union-attr]
        saved, m.reserved = m.reserved, 0  # the probe no longer shows it
        readings = self.readings()
        m.reserved = saved
        return self.send(dataclasses.replace(ev, readings=readings))

    def serve(self, name: str) -> int:
        """A request granted (loading the model if need be) and left in flight."""
        wid, effs = self.arrive(name)
        if any(isinstance(e, E.Start) for e in effs):
            effs = self.loaded(name)
        assert wid in granted(effs), effs
        return wid

    def load_idle(self, name: str) -> None:
        self.serve(name)
        self.send(E.Released(name))

    def on(self, name: str) -> dict[str, float]:
        return dict(self.core.models[name].placement)

    def used(self, dev: str) -> int:
        return self.core.used_on(dev)

    def state(self, name: str) -> State:
        return self.core.models[name].state


def granted(effs: list[E.Effect]) -> list[int]:
    return [e.waiter for e in effs if isinstance(e, E.Grant)]


def stops(effs: list[E.Effect]) -> list[str]:
    return [e.model for e in effs if isinstance(e, E.Stop)]


# ------------------------------------------------------------------------- placement


def test_a_model_goes_to_the_device_it_fits_best_without_evicting():
    node = Node(2, {"big": 12 * GiB, "small": 6 * GiB, "x": 7 * GiB})
    node.load_idle("big")  # gpu:0 (both empty: the lowest index)
    assert node.on("big") == {"gpu:0": 1.0}
    node.load_idle("small")  # gpu:0 has 8 GiB left, gpu:1 has 20: best fit is gpu:0
    assert node.on("small") == {"gpu:0": 1.0}
    node.load_idle("x")  # 2 GiB left on gpu:0: only gpu:1 holds it without an eviction
    assert node.on("x") == {"gpu:1": 1.0}
    assert node.used("gpu:0") == 18 * GiB and node.used("gpu:1") == 7 * GiB


def test_placement_prefers_fewest_evictions_over_best_fit():
    node = Node(2, {"a": 16 * GiB, "b1": 5 * GiB, "b2": 5 * GiB, "b3": 6 * GiB, "new": 10 * GiB})
    for name in ("a", "b1", "b2", "b3"):
        node.load_idle(name)
    assert node.on("a") == {"gpu:0": 1.0} and node.on("b1") == node.on("b2") == node.on("b3") == {"gpu:1": 1.0}
    node.clock.advance(1)
    node.send(E.Tick())
    # gpu:0: one eviction (a), 10 GiB left over; gpu:1: two (b1, b2), a better fit (4 GiB left)
    _, effs = node.arrive("new")
    assert stops(effs) == ["a"], effs
    node.stopped("a")
    assert node.state("new") == State.LOADING and node.on("new") == {"gpu:0": 1.0}


def test_eviction_is_per_device_least_recently_used_there():
    node = Node(2, {"a0": 12 * GiB, "a1": 12 * GiB, "b0": 6 * GiB, "c": 16 * GiB})
    for name in ("a0", "a1", "b0"):  # a0, b0 on gpu:0; a1 on gpu:1
        node.load_idle(name)
        node.clock.advance(1)
    assert node.on("b0") == {"gpu:0": 1.0} and node.on("a1") == {"gpu:1": 1.0}
    node.serve("a1")  # a1 busy: gpu:1 cannot make room
    _, effs = node.arrive("c")
    # gpu:0 frees 16 GiB only by evicting both a0 and b0, the models on gpu:0; nothing on gpu:1 moves
    assert sorted(stops(effs)) == ["a0", "b0"]
    assert node.state("a1") == State.READY


def test_a_model_larger_than_any_device_is_split_and_evicts_on_both():
    node = Node(3, {"s0": 12 * GiB, "s1": 12 * GiB, "s2": 4 * GiB, "huge": 30 * GiB}, caps={2: 8 * GiB},
                overhead=1 * GiB, device={"s2": "gpu:2"})
    for name in ("s0", "s1", "s2"):
        node.load_idle(name)
        node.clock.advance(1)
    assert node.on("s0") == {"gpu:0": 1.0} and node.on("s1") == {"gpu:1": 1.0}
    _, effs = node.arrive("huge")
    # 30 GiB (1 GiB of it overhead) over the two 20 GiB devices: each pays the overhead; the
    # 8 GiB device is not needed. The idle models on both devices go.
    assert sorted(stops(effs)) == ["s0", "s1"], effs
    for name in ("s0", "s1"):
        node.stopped(name)
    assert node.state("huge") == State.LOADING
    start = node.starts[-1]
    assert set(start.placement) == {"gpu:0", "gpu:1"}
    shares = {d: node.core.share(node.core.models["huge"], d) for d in start.placement}
    assert sum(shares.values()) == 31 * GiB, "the overhead is paid on every device the child touches"
    assert all(s <= 20 * GiB for s in shares.values())
    effs = node.loaded("huge")  # the probe shows 31 GiB over both devices
    assert node.used("gpu:0") <= 20 * GiB and node.used("gpu:1") <= 20 * GiB
    assert node.state("s2") == State.READY, "the third device was left alone"
    # remembered as one device's worth (the next split adds each device's overhead again)
    assert [e.bytes for e in effs if isinstance(e, E.Learn)] == [30 * GiB]
    assert node.core.models["huge"].reserved == 31 * GiB


def test_a_layer_split_uses_each_devices_room_in_proportion():
    node = Node(2, {"x": 8 * GiB, "huge": 26 * GiB})
    node.load_idle("x")
    node.serve("x")  # busy: stays
    _, effs = node.arrive("huge")  # gpu:0 has 12 GiB free, gpu:1 20: 26 GiB split 12:20, nothing evicted
    assert not stops(effs)
    assert node.state("huge") == State.LOADING
    frac = node.on("huge")
    assert frac["gpu:1"] > frac["gpu:0"], frac
    assert node.used("gpu:0") <= 20 * GiB and node.used("gpu:1") <= 20 * GiB
    # the layers landed 10 + 16 GiB, not exactly as planned: each device's ledger follows
    node.loaded("huge", per_device={"gpu:0": 10 * GiB, "gpu:1": 16 * GiB})
    assert node.used("gpu:0") == 8 * GiB + 10 * GiB and node.used("gpu:1") == 16 * GiB


def test_vllm_splits_in_equal_shares_over_a_power_of_two_of_devices():
    node = Node(8, {"tp": 50 * GiB}, vllm={"tp"}, overhead=2 * GiB)
    node.arrive("tp")
    placement = node.starts[-1].placement
    # 48 GiB of weights and KV: 3 devices would do, vLLM takes 4 with 12 + 2 GiB each
    assert len(placement) == 4 and len(set(placement.values())) == 1
    assert node.core.models["tp"].reserved == 4 * 14 * GiB


def test_a_model_too_big_for_all_devices_together_is_refused_with_the_numbers():
    node = Node(2, {"giant": 45 * GiB})
    wid, effs = node.arrive("giant")
    fail = [e for e in effs if isinstance(e, E.Fail)]
    assert fail and isinstance(fail[0].error, err.InsufficientMemory)
    assert "gpu:0" in str(fail[0].error) and "gpu:1" in str(fail[0].error)


# ------------------------------------------------------------------------- pins


def test_a_model_pinned_to_a_device_stays_there_and_evicts_only_there():
    node = Node(2, {"a": 12 * GiB, "b": 12 * GiB, "p": 10 * GiB}, device={"p": "gpu:1"})
    node.load_idle("a")
    node.load_idle("b")
    assert node.on("a") == {"gpu:0": 1.0} and node.on("b") == {"gpu:1": 1.0}
    node.clock.advance(5)
    node.serve("a")
    node.send(E.Released("a"))  # a used later than b; LRU alone would pick b anyway
    _, effs = node.arrive("p")
    assert stops(effs) == ["b"]
    node.stopped("b")
    assert node.on("p") == {"gpu:1": 1.0}


def test_a_pinned_model_is_never_evicted_on_its_device():
    node = Node(2, {"keep": 14 * GiB, "other": 14 * GiB, "new": 10 * GiB}, pinned={"keep"})
    node.load_idle("keep")
    node.load_idle("other")
    _, effs = node.arrive("new")
    assert stops(effs) == ["other"]


def test_a_model_pinned_to_a_device_that_is_not_planned_gets_a_clear_error():
    node = Node(2, {"p": 1 * GiB}, device={"p": "gpu:7"})
    _, effs = node.arrive("p")
    fail = [e for e in effs if isinstance(e, E.Fail)]
    assert fail and "gpu:7" in str(fail[0].error) and "not planned" in str(fail[0].error)


# ------------------------------------------------------------------------- independence


def test_a_busy_model_on_one_device_does_not_block_a_load_on_another():
    node = Node(2, {"busy": 18 * GiB, "idle": 18 * GiB, "want0": 10 * GiB, "want1": 10 * GiB},
                device={"want0": "gpu:0", "want1": "gpu:1"}, max_wait=30)
    node.load_idle("busy")
    node.load_idle("idle")
    node.serve("busy")  # gpu:0 holds a stream
    w0, effs = node.arrive("want0")
    assert not stops(effs) and node.state("want0") == State.UNLOADED, "never evicts a busy model"
    w1, effs = node.arrive("want1")  # queued behind want0, but on the other device
    assert stops(effs) == ["idle"]
    effs = node.stopped("idle")
    effs = node.loaded("want1")
    assert w1 in granted(effs)
    # past max_wait the busy model drains (not killed) for want0; still nothing else moves
    node.clock.advance(31)
    effs = node.send(E.Tick())
    assert node.state("busy") == State.DRAINING and not stops(effs)
    effs = node.send(E.Released("busy"))
    assert stops(effs) == ["busy"]


def test_a_swap_on_one_device_does_not_wait_for_a_drain_on_another():
    node = Node(2, {"a": 18 * GiB, "b": 18 * GiB, "c": 10 * GiB, "d": 10 * GiB},
                device={"c": "gpu:0", "d": "gpu:1"}, max_wait=5)
    node.load_idle("a")
    node.load_idle("b")
    node.serve("a")
    node.arrive("c")
    node.clock.advance(6)
    node.send(E.Tick())
    assert node.state("a") == State.DRAINING  # c waits for gpu:0's drain
    _, effs = node.arrive("d")
    assert stops(effs) == ["b"], "gpu:1 evicts for d at once"
    node.stopped("b")
    assert node.state("d") == State.LOADING and node.state("a") == State.DRAINING


def test_a_sleeping_split_model_wakes_on_the_devices_its_engine_holds():
    node = Node(2, {"tp": 30 * GiB, "x": 18 * GiB, "y": 18 * GiB}, vllm={"tp"}, sleepable={"tp"})
    node.load_idle("tp")
    devs = set(node.on("tp"))
    assert devs == {"gpu:0", "gpu:1"}
    node.clock.advance(1)
    _, effs = node.arrive("x")  # evicts tp: it sleeps
    assert stops(effs) == ["tp"]
    node.stopped("tp")
    assert node.state("tp") == State.SLEEPING
    node.loaded("x")
    node.send(E.Released("x"))
    node.clock.advance(1)
    _, effs = node.arrive("tp")
    assert stops(effs) == ["x"]
    node.stopped("x")
    assert node.state("tp") == State.WAKING and set(node.on("tp")) == devs


@pytest.mark.parametrize("n", [2, 4, 8])
def test_every_device_stays_within_its_budget_while_models_come_and_go(n):
    sizes = {f"m{i}": (3 + 5 * (i % 4)) * GiB for i in range(3 * n)}
    node = Node(n, sizes)
    for rnd in range(3):
        for name in sizes:
            wid, effs = node.arrive(name)
            for _ in range(4):
                for victim in stops(effs):
                    effs = node.stopped(victim)
                if any(isinstance(e, E.Start) and e.model == name for e in effs) or node.state(name) == State.LOADING:
                    effs = node.loaded(name)
            node.send(E.Released(name))
            node.clock.advance(1)
            for d in node.core.devices:
                assert node.used(d) <= 20 * GiB, (d, node.used(d))
    used_devices = {d for m in node.core.models.values() for d in m.placement}
    assert len(used_devices) == n, "placement spreads models over every device"


def test_a_model_waiting_for_busy_models_holds_only_the_device_it_waits_for():
    node = Node(2, {"a": 18 * GiB, "b": 12 * GiB, "c": 6 * GiB, "x": 15 * GiB, "y": 7 * GiB},
                device={"a": "gpu:0", "b": "gpu:1", "c": "gpu:1"}, max_wait=30)
    for name in ("a", "b", "c"):
        node.load_idle(name)
    node.serve("a")
    node.serve("b")
    _, effs = node.arrive("x")  # fits nowhere without draining; draining a on gpu:0 is its way in
    assert not stops(effs) and node.state("x") == State.UNLOADED
    wy, effs = node.arrive("y")  # needs c evicted on gpu:1, which x does not wait for
    assert stops(effs) == ["c"]
    node.stopped("c")
    assert wy in granted(node.loaded("y"))
    node.clock.advance(31)
    node.send(E.Tick())
    assert node.state("a") == State.DRAINING and node.state("b") == State.READY, "x drains only gpu:0"
