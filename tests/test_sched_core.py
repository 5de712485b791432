"""The decision core as a specification: events in, effects out. Synchronous: no loop, no sleeps.

Each test feeds the core the events the runner would (requests, the launcher's reports, ticks
with probe readings) and reads back the effects it asks for.
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest

from schedfakes import MiB, FakeClock, FakeInstance, entry
from swapper.catalog import ModelEntry
from swapper.sched import Core, IllegalTransition, Model, SchedulerConfig, State
from swapper.sched import errors as err
from swapper.sched import events as E
from swapper.sched.ledger import Reading, capacity
from swapper.sched.lifecycle import TRANSITIONS, transition
from swapper.units import SizeSpec

GiB = 1 << 30


class Spec:
    """A core with a fake clock; `send` returns the effects of one event."""

    def __init__(self, sizes: dict[str, int], cap: int, *, total: int = 64 * GiB, pinned: set[str] = frozenset(),
                 serial: set[str] = frozenset(), sleepable: set[str] = frozenset(), **cfg: object):
        self.clock = FakeClock()
        self.sizes = sizes
        self.total = total
        config = SchedulerConfig(budget=SizeSpec(bytes=cap), reserve=0, **cfg)  # type: ignore[arg-type]
        self.core = Core(config, self.clock, Reading(total, 0, total), host_capacity=16 * GiB, pid_visible=True,
                         serial_start=lambda e: e.id in serial, can_sleep=lambda e: e.id in sleepable)
        self.entries = {n: entry(n, pinned=n in pinned, sleep=n in sleepable) for n in sizes}
        self.send(E.CatalogChanged(list(self.entries.values())))
        self.ids = itertools.count(1)
        self.instances: dict[str, FakeInstance] = {}

    def send(self, ev: E.Event) -> list[E.Effect]:
        return self.core.handle(ev)

    def m(self, name: str) -> Model:
        return self.core.models[name]

    def state(self, name: str) -> State:
        return self.m(name).state

    def arrive(self, name: str, **kw: object) -> tuple[int, list[E.Effect]]:
        wid = next(self.ids)
        return wid, self.send(E.Arrived(wid, name, self.sizes[name], **kw))  # type: ignore[arg-type]

    def used(self) -> int:
        return sum(m.reserved for m in self.core.models.values() if m.holds_device)

    def loaded(self, name: str) -> list[E.Effect]:
        """The launcher reports `name` healthy; the probe shows its footprint."""
        inst = self.instances[name] = FakeInstance(name)
        return self.send(E.Loaded(name, inst, 1.0, self.sizes[name]))

    def stopped(self, name: str) -> list[E.Effect]:
        self.instances.pop(name, None)
        reading = Reading(self.total, self.used() - self.m(name).reserved, self.total - self.used() + self.m(name).reserved)
        return self.send(E.Stopped(name, slept=False, seconds=0.5, reading=reading))

    def crash(self, name: str, code: int = 137) -> list[E.Effect]:
        return self.send(E.Exited(name, self.instances.pop(name), code))

    def serve(self, name: str) -> int:
        """A request for an idle model, granted and left in flight (a long stream)."""
        wid, effs = self.arrive(name)
        if starts(effs):
            effs = self.loaded(name)
        assert granted(effs) == [wid], effs
        return wid


def starts(effs: list[E.Effect]) -> list[str]:
    return [e.model for e in effs if isinstance(e, E.Start)]


def stops(effs: list[E.Effect]) -> list[str]:
    return [e.model for e in effs if isinstance(e, E.Stop)]


def granted(effs: list[E.Effect]) -> list[int]:
    return [e.waiter for e in effs if isinstance(e, E.Grant)]


def failures(effs: list[E.Effect]) -> dict[int, err.SchedulerError]:
    return {e.waiter: e.error for e in effs if isinstance(e, E.Fail)}


# ------------------------------------------------------------------------- lifecycle


def test_an_illegal_transition_is_a_loud_error():
    m = Model(entry=entry("a"))
    with pytest.raises(IllegalTransition):
        transition(m, State.READY)  # unloaded -> ready skips the load
    transition(m, State.LOADING)
    with pytest.raises(IllegalTransition):
        transition(m, State.DRAINING)


def test_every_state_has_a_way_out_and_back_to_unloaded():
    reach = {State.UNLOADED}
    for _ in range(len(State)):
        reach |= {t for s in reach for t in TRANSITIONS[s]}
    assert reach == set(State)
    for s in State:
        seen, todo = set(), [s]
        while todo:
            x = todo.pop()
            seen.add(x)
            todo += [t for t in TRANSITIONS[x] if t not in seen]
        assert State.UNLOADED in seen, s


def test_a_transition_replaces_the_whole_record():
    s = Spec({"a": 600 * MiB, "b": 600 * MiB}, 1000 * MiB, max_wait=10)
    s.serve("a")
    s.arrive("b")
    s.clock.advance(11)
    s.send(E.Tick())
    assert s.state("a") == State.DRAINING and s.m("a").victim_of == "b"
    s.crash("a")
    assert s.state("a") == State.UNLOADED
    assert (s.m("a").victim_of, s.m("a").stop_reason, s.m("a").drain_deadline) == (None, "", None)


# ----------------------------------------------------------------------------- crashes


def test_a_crashed_loaded_model_reloads_at_once_on_the_next_request():
    s = Spec({"a": 100 * MiB}, 1000 * MiB)
    wid = s.serve("a")
    s.send(E.Released("a"))
    s.crash("a")
    assert s.state("a") == State.UNLOADED and s.used() == 0
    assert not s.m("a").failed and s.m("a").exit_code == 137, "a crash is not a failed load"
    _, effs = s.arrive("a")
    assert starts(effs) == ["a"] and not failures(effs), "no back-off after a crash"
    assert wid


def test_requests_waiting_when_a_model_crashes_wait_for_its_reload():
    s = Spec({"a": 100 * MiB}, 1000 * MiB)
    s.serve("a")
    # the runner re-queues a request whose connection was refused: it arrives again
    effs = s.crash("a")
    assert not starts(effs)
    w1, effs = s.arrive("a")
    w2, effs2 = s.arrive("a")
    assert starts(effs) == ["a"] and starts(effs2) == [], "one reload for all of them"
    assert sorted(granted(s.loaded("a"))) == [w1, w2]


def test_a_crash_soon_after_a_post_crash_reload_is_a_crash_loop_and_backs_off():
    s = Spec({"a": 100 * MiB}, 1000 * MiB, backoff_base=1.0, crash_window=60.0)
    s.serve("a")
    s.crash("a")
    s.serve("a")  # reloaded at once
    s.clock.advance(5)
    s.crash("a")  # again within a minute of being loaded: a loop
    assert s.m("a").failed and s.m("a").backoff_until == s.clock() + 1.0
    wid, effs = s.arrive("a")
    assert isinstance(failures(effs)[wid], err.LoadFailed) and not starts(effs)
    s.clock.advance(1.5)
    _, effs = s.arrive("a")
    assert starts(effs) == ["a"], "the back-off ends"


def test_a_crash_long_after_the_reload_is_not_a_loop():
    s = Spec({"a": 100 * MiB}, 1000 * MiB, crash_window=60.0)
    s.serve("a")
    s.crash("a")
    s.serve("a")
    s.clock.advance(61)
    s.crash("a")
    assert not s.m("a").failed
    _, effs = s.arrive("a")
    assert starts(effs) == ["a"]


def test_requests_on_a_ready_model_at_rest_are_granted_and_released_without_a_pump():
    s = Spec({"a": 600 * MiB, "b": 600 * MiB}, 1000 * MiB)
    s.serve("a")
    assert s.core.at_rest
    pumps = []
    pump = s.core.pump
    s.core.pump = lambda: (pumps.append(1), pump())  # type: ignore[method-assign]
    wid, effs = s.arrive("a")
    assert granted(effs) == [wid] and s.m("a").inflight == 2
    s.send(E.Released("a"))
    assert pumps == [] and s.core.at_rest, "nothing waits anywhere: nothing to pump"
    # once another model waits for room, a release on the ready model is what lets it in
    wid_b, effs = s.arrive("b")
    assert not starts(effs) and not s.core.at_rest and pumps == [1]
    effs = s.send(E.Released("a"))
    assert stops(effs) == ["a"], "a, idle now, is evicted for b"
    s.stopped("a")
    assert granted(s.loaded("b")) == [wid_b]


def test_a_victim_that_crashes_while_draining_lets_its_claimant_load_at_once():
    s = Spec({"a": 600 * MiB, "b": 600 * MiB}, 1000 * MiB, max_wait=10)
    s.serve("a")  # a long stream on a
    wid, effs = s.arrive("b")
    assert not starts(effs), "b waits: a is busy"
    s.clock.advance(11)
    effs = s.send(E.Tick())
    assert s.state("a") == State.DRAINING and s.state("b") == State.AWAITING_ROOM
    effs = s.crash("a")
    assert starts(effs) == ["b"], "the claim died with the victim: b loads now"
    assert granted(s.loaded("b")) == [wid]


def test_a_stale_stop_reason_never_stops_a_model_after_its_next_load():
    s = Spec({"a": 100 * MiB}, 1000 * MiB)
    s.serve("a")
    wid = next(s.ids)
    s.send(E.Unload(wid, "a", force=False, reason="manual"))  # drains: a request is in flight
    assert s.state("a") == State.DRAINING
    s.crash("a")
    s.send(E.Released("a"))
    s.serve("a")
    s.send(E.Released("a"))
    assert s.state("a") == State.READY


def test_a_sleeping_model_that_crashes_is_simply_unloaded():
    s = Spec({"a": 600 * MiB, "b": 600 * MiB}, 1000 * MiB, sleepable={"a"})
    s.serve("a")
    s.send(E.Released("a"))
    effs = s.arrive("b")[1]
    assert [e.sleep for e in effs if isinstance(e, E.Stop)] == [True], "a budget eviction puts it to sleep"
    s.send(E.Stopped("a", slept=True, seconds=0.1, reading=Reading(s.total, 0, s.total)))
    assert s.state("a") == State.SLEEPING and s.m("a").host_reserved == 600 * MiB
    s.crash("a")
    assert s.state("a") == State.UNLOADED and s.m("a").instance is None and s.m("a").host_reserved == 0


# ----------------------------------------------------------------------------- reloads


def changed(e: ModelEntry, **kw: object) -> ModelEntry:
    return dataclasses.replace(e, **kw)  # type: ignore[arg-type]


def test_reload_restarts_a_pinned_resident_model_with_its_changed_args_at_once():
    s = Spec({"a": 100 * MiB}, 1000 * MiB, pinned={"a"})
    s.serve("a")
    s.send(E.Released("a"))
    new = changed(s.entries["a"], args=("--temp", "0"))
    effs = s.send(E.CatalogChanged([new]))
    assert stops(effs) == ["a"]
    effs = s.stopped("a")
    start = [e for e in effs if isinstance(e, E.Start)]
    assert [e.entry.args for e in start] == [("--temp", "0")], "restarted with the new entry"
    s.loaded("a")
    assert s.m("a").entry.args == ("--temp", "0")


def test_reload_restarts_an_unpinned_changed_model_on_next_use():
    s = Spec({"a": 100 * MiB}, 1000 * MiB)
    s.serve("a")
    s.send(E.Released("a"))
    new = changed(s.entries["a"], ctx_size=8192)
    assert stops(s.send(E.CatalogChanged([new]))) == ["a"]
    assert starts(s.stopped("a")) == []
    _, effs = s.arrive("a")
    assert [e.entry.ctx_size for e in effs if isinstance(e, E.Start)] == [8192]


def test_reload_drains_a_busy_changed_model_before_restarting_it():
    s = Spec({"a": 100 * MiB}, 1000 * MiB, pinned={"a"})
    s.serve("a")
    new = changed(s.entries["a"], args=("--x",))
    assert stops(s.send(E.CatalogChanged([new]))) == []
    assert s.state("a") == State.DRAINING
    wid, effs = s.arrive("a")
    assert not granted(effs), "a draining model takes no new request"
    assert stops(s.send(E.Released("a"))) == ["a"]
    effs = s.stopped("a")
    assert starts(effs) == ["a"]
    assert granted(s.loaded("a")) == [wid]


def test_reload_with_only_aliases_changed_keeps_the_child():
    s = Spec({"a": 100 * MiB}, 1000 * MiB)
    s.serve("a")
    effs = s.send(E.CatalogChanged([changed(s.entries["a"], aliases=("alpha",))]))
    assert stops(effs) == [] and s.state("a") == State.READY and s.m("a").entry.aliases == ("alpha",)


def test_reload_drains_and_unloads_a_removed_model():
    s = Spec({"a": 100 * MiB, "b": 100 * MiB}, 1000 * MiB)
    s.serve("a")
    effs = s.send(E.CatalogChanged([s.entries["b"]]))
    assert s.state("a") == State.DRAINING and not stops(effs)
    assert stops(s.send(E.Released("a"))) == ["a"]
    s.stopped("a")
    assert "a" not in s.core.models
    wid, effs = s.arrive("b")
    assert starts(effs) == ["b"]


# ----------------------------------------------------------------------------- queue timeout


def test_queue_timeout_does_not_cut_a_wait_on_a_load_that_has_started():
    s = Spec({"a": 100 * MiB}, 1000 * MiB, queue_timeout=1.0)
    wid, effs = s.arrive("a")
    assert starts(effs) == ["a"]
    s.clock.advance(5)  # a slow load on a busy box
    assert failures(s.send(E.Tick())) == {}
    assert granted(s.loaded("a")) == [wid]


def test_queue_timeout_bounds_the_wait_for_room():
    s = Spec({"a": 600 * MiB, "b": 600 * MiB}, 1000 * MiB, queue_timeout=1.0, max_wait=999)
    s.serve("a")
    wid, effs = s.arrive("b")
    s.clock.advance(1.5)
    assert isinstance(failures(s.send(E.Tick()))[wid], err.QueueTimeout)


# ----------------------------------------------------------------------------- budget


def test_capacity_is_the_budget_capped_by_the_device_minus_the_reserve():
    assert capacity(SizeSpec(bytes=450 * MiB), 512 * MiB, 24 * GiB) == 450 * MiB
    assert capacity(SizeSpec(fraction=1.0), 512 * MiB, 24 * GiB) == 24 * GiB - 512 * MiB
    assert capacity(SizeSpec(fraction=0.5), 512 * MiB, 24 * GiB) == 12 * GiB
    assert capacity(SizeSpec(bytes=100 * MiB), 512 * MiB, 0) == 100 * MiB, "unknown device: the budget"


def test_a_budget_of_450mib_serves_a_200mib_model():
    s = Spec({"a": 200 * MiB}, 450 * MiB)
    _, effs = s.arrive("a")
    assert starts(effs) == ["a"]


def test_zero_capacity_refuses_every_model_with_insufficient_memory():
    s = Spec({"a": 200 * MiB}, 0)
    wid, effs = s.arrive("a")
    assert isinstance(failures(effs)[wid], err.InsufficientMemory) and not starts(effs)


# ----------------------------------------------------------------------------- commands


def test_pinning_makes_a_model_unevictable_and_unpinning_evictable_again():
    s = Spec({"a": 600 * MiB, "b": 600 * MiB}, 1000 * MiB)
    s.serve("a")
    s.send(E.Released("a"))
    s.send(E.SetPinned("a", True))
    wid, effs = s.arrive("b")
    assert stops(effs) == [], "a pinned model is never evicted"
    effs = s.send(E.SetPinned("a", False))
    assert stops(effs) == ["a"]


def test_without_autoload_a_model_that_is_not_loaded_is_refused():
    s = Spec({"a": 100 * MiB}, 1000 * MiB)
    wid, effs = s.arrive("a", autoload=False)
    assert isinstance(failures(effs)[wid], err.NotLoaded) and not starts(effs)
    s.serve("a")
    wid, effs = s.arrive("a", autoload=False)
    assert granted(effs) == [wid]


def test_an_admin_load_of_a_loaded_model_is_refused_but_a_waiting_one_is_not():
    s = Spec({"a": 100 * MiB}, 1000 * MiB)
    s.serve("a")
    wid, effs = s.arrive("a", counts=False, refuse_loaded=True)
    assert isinstance(failures(effs)[wid], err.AlreadyLoaded)


def test_engines_that_size_themselves_from_free_memory_start_one_at_a_time():
    s = Spec({"v1": 100 * MiB, "v2": 100 * MiB}, 1000 * MiB, serial={"v1", "v2"})
    _, e1 = s.arrive("v1")
    _, e2 = s.arrive("v2")
    assert starts(e1) == ["v1"] and starts(e2) == []
    assert starts(s.loaded("v1")) == ["v2"]


def test_a_load_that_fails_backs_off_and_fails_its_waiters():
    s = Spec({"a": 100 * MiB}, 1000 * MiB, backoff_base=2.0)
    w1, _ = s.arrive("a")
    effs = s.send(E.LoadFailedEvent("a", err.LoadError("boom", 1, ["bad gguf"]), 0.3))
    assert isinstance(failures(effs)[w1], err.LoadFailed)
    assert s.m("a").failed and s.m("a").backoff_until == s.clock() + 2.0
