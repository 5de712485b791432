"""The scheduler as a specification: fake clock, fake probe, fake launcher; no sleeps, no processes."""

from __future__ import annotations

import asyncio

import pytest

from schedfakes import MiB, World, world
from swapper.errors import scheduler_status
from swapper.scheduler import (Candidate, InsufficientMemory, LoadFailed, Pinned, QueueFull, QueueTimeout,
                               ShuttingDown, State, plan_eviction)


async def request(w: World, name: str, log: list[str] | None = None) -> None:
    async with w.sched.acquire(name):
        if log is not None:
            log.append(name)


class Holder:
    """A request that stays in flight until released (a long stream)."""

    def __init__(self, w: World, name: str):
        self.release = asyncio.Event()
        self.granted = asyncio.Event()
        self.task = asyncio.ensure_future(self._run(w, name))

    async def _run(self, w: World, name: str) -> None:
        async with w.sched.acquire(name):
            self.granted.set()
            await self.release.wait()


# ------------------------------------------------------------------------- plan_eviction


def cand(i: str, b: int, t: float, **kw: object) -> Candidate:
    return Candidate(i, b, t, **kw)  # type: ignore[arg-type]


def test_plan_eviction_takes_least_recently_used_first():
    cs = [cand("a", 10, 3.0), cand("b", 10, 1.0), cand("c", 10, 2.0)]
    assert plan_eviction(15, 0, cs) == ["b", "c"]


def test_plan_eviction_never_picks_busy_pinned_or_queued_models():
    cs = [cand("busy", 50, 1.0, inflight=1), cand("pin", 50, 1.0, pinned=True),
          cand("wanted", 50, 1.0, queued=2), cand("idle", 50, 5.0)]
    assert plan_eviction(40, 0, cs) == ["idle"]
    assert plan_eviction(60, 0, cs) is None


def test_plan_eviction_drops_victims_a_larger_one_made_unnecessary():
    cs = [cand("small-old", 1, 1.0), cand("big", 6, 2.0)]
    assert plan_eviction(5, 0, cs) == ["big"]


def test_plan_eviction_counts_slots_for_max_models():
    cs = [cand("a", 1, 2.0), cand("b", 1, 1.0)]
    assert plan_eviction(0, 1, cs) == ["b"]
    assert plan_eviction(0, 3, cs) is None


def test_plan_eviction_includes_busy_models_only_when_draining_is_allowed():
    cs = [cand("busy", 10, 1.0, inflight=2)]
    assert plan_eviction(5, 0, cs) is None
    assert plan_eviction(5, 0, cs, include_busy=True) == ["busy"]


# ----------------------------------------------------------------------------- loading


async def test_cold_request_loads_the_model_once_for_many_waiters():
    w = world({"a": 100 * MiB}, capacity=1000 * MiB, auto=False)
    tasks = [asyncio.ensure_future(request(w, "a")) for _ in range(5)]
    await w.spin()
    assert w.launcher.starts == ["a"] and w.state("a") == "loading"
    w.launcher.finish("a")
    await asyncio.gather(*tasks)
    assert w.launcher.starts == ["a"]
    assert w.state("a") == "ready" and w.sched.models["a"].inflight == 0


async def test_measured_footprint_replaces_the_estimate_and_is_learned():
    w = world({"a": 100 * MiB}, capacity=1000 * MiB)
    w.launcher.footprints["a"] = 130 * MiB
    await request(w, "a")
    m = w.sched.models["a"]
    assert m.reserved == 130 * MiB and m.measured == 130 * MiB
    assert w.est.learned["a"] == 130 * MiB


async def test_model_larger_than_the_whole_budget_is_refused_at_once():
    w = world({"huge": 2000 * MiB}, capacity=1000 * MiB)
    with pytest.raises(InsufficientMemory) as e:
        await request(w, "huge")
    assert "budget" in e.value.message and scheduler_status(e.value) == 503
    assert w.launcher.starts == []


async def test_models_that_fit_side_by_side_stay_resident_together():
    w = world({"a": 300 * MiB, "b": 300 * MiB}, capacity=1000 * MiB)
    await request(w, "a")
    await request(w, "b")
    assert w.resident() == {"a", "b"} and w.launcher.stops == []


async def test_least_recently_used_idle_model_is_evicted_to_fit():
    w = world({"a": 400 * MiB, "b": 400 * MiB, "c": 400 * MiB}, capacity=1000 * MiB)
    await request(w, "a")
    w.clock.advance(1)
    await request(w, "b")
    w.clock.advance(1)
    await request(w, "a")  # a is now the most recently used
    w.clock.advance(1)
    await request(w, "c")
    assert w.launcher.stops == ["b"]
    assert w.resident() == {"a", "c"}


async def test_busy_model_is_never_evicted():
    w = world({"a": 600 * MiB, "b": 600 * MiB}, capacity=1000 * MiB)
    h = Holder(w, "a")
    await h.granted.wait()
    t = asyncio.ensure_future(request(w, "b"))
    await w.spin()
    assert w.launcher.stops == [] and w.state("a") == "ready"
    assert w.sched.models["b"].queue, "b waits in its queue"
    h.release.set()
    await asyncio.gather(h.task, t)
    assert w.launcher.stops == ["a"] and w.resident() == {"b"}


async def test_pinned_model_is_never_evicted():
    w = world({"p": 600 * MiB, "b": 600 * MiB}, capacity=1000 * MiB, pinned={"p"}, queue_timeout=10.0)
    await w.sched.load("p")
    t = asyncio.ensure_future(request(w, "b"))
    await w.spin()
    assert w.launcher.stops == []
    w.clock.advance(11)
    w.sched.tick()
    with pytest.raises(QueueTimeout):
        await t
    assert w.resident() == {"p"}


async def test_foreign_memory_on_the_device_shrinks_what_can_be_loaded():
    w = world({"a": 400 * MiB}, capacity=1000 * MiB, total=1000 * MiB)
    w.probe.used = 800 * MiB  # another process took most of the GPU
    t = asyncio.ensure_future(request(w, "a"))
    await w.spin()
    assert w.launcher.starts == [], "never launch a load the device cannot hold"
    w.probe.used = 100 * MiB
    w.sched.tick()
    await t
    assert w.launcher.starts == ["a"]


async def test_victims_memory_must_show_free_on_the_probe_before_the_load_starts():
    w = world({"a": 600 * MiB, "b": 600 * MiB}, capacity=1000 * MiB, total=1000 * MiB, settle=5.0)
    await request(w, "a")
    real_stop = w.launcher.stop

    async def slow_release(inst, entry):  # the driver frees memory a moment after the process exits
        w.launcher.stops.append(entry.id)
        inst.alive = False

    w.launcher.stop = slow_release  # type: ignore[method-assign]
    t = asyncio.ensure_future(request(w, "b"))
    await w.spin()
    assert w.launcher.stops == ["a"] and w.launcher.starts == ["a"], "b waits for the memory"
    w.probe.per_pid.clear()
    w.launcher.stop = real_stop  # type: ignore[method-assign]
    w.sched.tick()
    await t
    assert w.launcher.starts == ["a", "b"]


async def test_max_models_caps_the_resident_count():
    w = world({"a": 1 * MiB, "b": 1 * MiB, "c": 1 * MiB}, capacity=1000 * MiB, max_models=2)
    for n in ("a", "b", "c"):
        await request(w, n)
        w.clock.advance(1)
    assert w.resident() == {"b", "c"} and w.launcher.stops == ["a"]


async def test_loads_are_serialised_when_the_driver_hides_process_memory():
    w = world({"a": 100 * MiB, "b": 100 * MiB}, capacity=1000 * MiB, auto=False, visible=False)
    ta = asyncio.ensure_future(request(w, "a"))
    tb = asyncio.ensure_future(request(w, "b"))
    await w.spin()
    assert w.launcher.starts == ["a"], "b waits: used-before vs used-after needs one load at a time"
    w.launcher.finish("a")
    await w.spin()
    assert w.launcher.starts == ["a", "b"]
    w.launcher.finish("b")
    await asyncio.gather(ta, tb)
    assert w.sched.models["a"].measured == 100 * MiB, "measured as the device's used-memory delta"


# ----------------------------------------------------------------------------- queues


async def test_queue_of_abab_with_room_for_one_is_served_as_aabb():
    w = world({"a": 600 * MiB, "b": 600 * MiB}, capacity=1000 * MiB, auto=False)
    served: list[str] = []
    tasks = []
    for n in ("a", "b", "a", "b"):
        tasks.append(asyncio.ensure_future(request(w, n, served)))
        await w.spin()
    w.launcher.finish("a")
    await w.spin()
    w.launcher.finish("b")
    await asyncio.gather(*tasks)
    assert served == ["a", "a", "b", "b"]
    assert w.launcher.starts == ["a", "b"], "two loads, not four"


async def test_full_queue_answers_queue_full_with_retry_after():
    w = world({"a": 100 * MiB}, capacity=1000 * MiB, auto=False, queue_size=2)
    tasks = [asyncio.ensure_future(request(w, "a")) for _ in range(2)]
    await w.spin()
    with pytest.raises(QueueFull) as e:
        await request(w, "a")
    assert e.value.retry_after and e.value.retry_after >= 1
    w.launcher.finish("a")
    await asyncio.gather(*tasks)


async def test_waiting_longer_than_the_queue_timeout_is_a_504():
    w = world({"a": 600 * MiB, "busy": 600 * MiB}, capacity=1000 * MiB, queue_timeout=30.0, max_wait=999)
    h = Holder(w, "busy")
    await h.granted.wait()
    t = asyncio.ensure_future(request(w, "a"))  # waits for room: busy is never evicted
    await w.spin()
    w.clock.advance(29)
    w.sched.tick()
    assert not t.done()
    w.clock.advance(2)
    w.sched.tick()
    with pytest.raises(QueueTimeout) as e:
        await t
    assert scheduler_status(e.value) == 504
    h.release.set()
    await h.task


async def test_a_waiter_whose_client_left_starts_no_load_and_evicts_nothing():
    w = world({"a": 600 * MiB, "b": 600 * MiB}, capacity=1000 * MiB)
    h = Holder(w, "a")
    await h.granted.wait()
    t = asyncio.ensure_future(request(w, "b"))
    await w.spin()
    t.cancel()  # the client disconnects while b waits for a to become idle
    await w.spin()
    assert not w.sched.models["b"].queue
    h.release.set()
    await h.task
    w.sched.tick()
    await w.spin()
    assert w.launcher.stops == [] and w.launcher.starts == ["a"]


async def test_after_max_wait_a_busy_model_is_drained_for_the_waiting_one():
    w = world({"a": 600 * MiB, "b": 600 * MiB}, capacity=1000 * MiB, max_wait=60.0)
    h = Holder(w, "a")
    await h.granted.wait()
    tb = asyncio.ensure_future(request(w, "b"))
    await w.spin()
    w.clock.advance(61)
    w.sched.tick()
    assert w.state("a") == "draining"
    late_a = asyncio.ensure_future(request(w, "a"))  # steady traffic to a now queues
    await w.spin()
    assert not late_a.done() and w.launcher.stops == [], "a's stream is never cut"
    h.release.set()
    await tb
    assert w.launcher.stops[0] == "a" and w.launcher.starts[:2] == ["a", "b"]
    # a's queued request is served once b is idle again
    await late_a
    assert w.launcher.starts == ["a", "b", "a"] and w.launcher.stops == ["a", "b"]


async def test_drain_for_a_waiter_that_left_is_called_off():
    w = world({"a": 600 * MiB, "b": 600 * MiB}, capacity=1000 * MiB, max_wait=60.0)
    h = Holder(w, "a")
    await h.granted.wait()
    tb = asyncio.ensure_future(request(w, "b"))
    await w.spin()
    w.clock.advance(61)
    w.sched.tick()
    assert w.state("a") == "draining"
    tb.cancel()
    await w.spin()
    assert w.state("a") == "ready", "no one needs the room any more"
    await request(w, "a")
    h.release.set()
    await h.task
    assert w.launcher.stops == []


async def test_a_big_model_is_not_starved_by_small_ones_that_fit():
    w = world({"big": 800 * MiB, "x": 300 * MiB, "s": 300 * MiB}, capacity=1000 * MiB, max_wait=60.0)
    hx = Holder(w, "x")
    await hx.granted.wait()
    tbig = asyncio.ensure_future(request(w, "big"))
    await w.spin()
    w.clock.advance(61)  # big has waited past max_wait
    ts = asyncio.ensure_future(request(w, "s"))
    w.sched.tick()
    await w.spin()
    assert "s" not in w.launcher.starts, "a small model may not overtake a starving big one"
    hx.release.set()
    await tbig
    await ts
    assert w.launcher.starts.index("big") < w.launcher.starts.index("s")


# ----------------------------------------------------------------------------- ttl


async def test_idle_ttl_unloads_idle_models_but_never_the_last_resident():
    w = world({"a": 100 * MiB, "b": 100 * MiB}, capacity=1000 * MiB, idle_ttl=60.0)
    await request(w, "a")
    await request(w, "b")
    w.clock.advance(61)
    w.sched.tick()
    await w.spin()
    assert len(w.launcher.stops) == 1 and len(w.resident()) == 1
    w.clock.advance(600)
    w.sched.tick()
    await w.spin()
    assert len(w.resident()) == 1, "the node never goes unready for lack of traffic"


async def test_per_model_ttl_overrides_the_global_one():
    w = world({"a": 100 * MiB, "b": 100 * MiB}, capacity=1000 * MiB, idle_ttl=0.0, ttl={"a": 10.0})
    await request(w, "a")
    await request(w, "b")
    w.clock.advance(11)
    w.sched.tick()
    await w.spin()
    assert w.launcher.stops == ["a"]


# ----------------------------------------------------------------------------- failures


async def test_load_failure_fails_every_waiter_and_backs_off():
    w = world({"bad": 100 * MiB, "ok": 100 * MiB}, capacity=1000 * MiB, auto=False)
    w.launcher.fail.add("bad")
    tasks = [asyncio.ensure_future(request(w, "bad")) for _ in range(3)]
    await w.spin()
    w.launcher.finish("bad")
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, LoadFailed) for r in results)
    assert "cannot load model" in results[0].message, "the child's last log lines are in the error"
    m = w.sched.models["bad"]
    assert m.failed and m.state == State.UNLOADED and m.exit_code == 1
    with pytest.raises(LoadFailed) as e:
        await request(w, "bad")
    assert e.value.retry_after == 1
    assert w.launcher.starts == ["bad"], "no retry inside the back-off"
    w.launcher.auto = True
    await request(w, "ok")  # other models are unaffected
    w.clock.advance(1.5)
    w.launcher.fail.clear()
    await request(w, "bad")
    assert not w.sched.models["bad"].failed


async def test_a_resident_child_that_dies_frees_its_share_of_the_ledger():
    w = world({"a": 600 * MiB, "b": 600 * MiB}, capacity=1000 * MiB)
    await request(w, "a")
    assert w.sched.ledger_used() == 600 * MiB
    w.launcher.crash("a", 137)
    assert w.state("a") == "unloaded" and w.sched.models["a"].exit_code == 137
    assert w.sched.ledger_used() == 0
    await request(w, "b")
    assert w.launcher.stops == [], "b loaded into the freed room without evicting anything"


# ----------------------------------------------------------------------------- admin & shutdown


async def test_unload_drains_in_flight_requests_first():
    w = world({"a": 100 * MiB}, capacity=1000 * MiB)
    h = Holder(w, "a")
    await h.granted.wait()
    u = asyncio.ensure_future(w.sched.unload("a"))
    await w.spin()
    assert w.state("a") == "draining" and w.launcher.stops == []
    h.release.set()
    await u
    assert w.launcher.stops == ["a"] and w.state("a") == "unloaded"


async def test_pinned_model_needs_force_to_unload():
    w = world({"p": 100 * MiB}, capacity=1000 * MiB, pinned={"p"})
    await w.sched.load("p")
    with pytest.raises(Pinned):
        await w.sched.unload("p")
    await w.sched.unload("p", force=True)
    assert w.state("p") == "unloaded"


async def test_manual_load_that_does_not_fit_evicts_like_a_demand_load():
    w = world({"a": 600 * MiB, "b": 600 * MiB}, capacity=1000 * MiB)
    await request(w, "a")
    await w.sched.load("b")
    assert w.launcher.stops == ["a"] and w.resident() == {"b"}


async def test_shutdown_fails_waiters_and_lets_in_flight_requests_finish():
    w = world({"a": 600 * MiB, "b": 600 * MiB}, capacity=1000 * MiB)
    h = Holder(w, "a")
    await h.granted.wait()
    waiting = asyncio.ensure_future(request(w, "b"))
    await w.spin()
    down = asyncio.ensure_future(w.sched.shutdown(drain_timeout=30))
    await w.spin()
    with pytest.raises(ShuttingDown):
        await waiting
    assert w.launcher.stops == [], "the stream in flight is not cut"
    with pytest.raises(ShuttingDown):
        await request(w, "a")
    h.release.set()
    await down
    assert w.launcher.stops == ["a"]


async def test_ready_means_at_least_one_model_resident():
    w = world({"a": 100 * MiB}, capacity=1000 * MiB)
    assert not w.sched.ready
    await request(w, "a")
    assert w.sched.ready


# ----------------------------------------------------------------------------- sleep tier


async def test_a_sleeping_model_frees_device_budget_and_takes_host_budget():
    w = world({"a": 600 * MiB, "b": 600 * MiB}, capacity=1000 * MiB, sleepable={"a"})
    await request(w, "a")
    await request(w, "b")
    assert w.launcher.sleeps == ["a"] and w.launcher.stops == []
    assert w.state("a") == "sleeping"
    assert w.sched.ledger_used() == 600 * MiB and w.sched.host_used() == 600 * MiB
    w.clock.advance(1)
    await request(w, "a")
    assert w.launcher.wakes == ["a"] and w.launcher.starts == ["a", "b"], "woken, not cold-started"


async def test_host_budget_overflow_stops_the_least_recently_used_sleeper():
    from swapper.units import SizeSpec

    w = world({"a": 600 * MiB, "b": 600 * MiB, "c": 600 * MiB}, capacity=1000 * MiB, sleepable={"a", "b"},
              host_budget=SizeSpec(bytes=700 * MiB))
    await request(w, "a")
    w.clock.advance(1)
    await request(w, "b")  # a sleeps
    w.clock.advance(1)
    await request(w, "c")  # b sleeps: two sleepers exceed the host budget, a (older) stops
    await w.spin()
    assert w.launcher.sleeps == ["a", "b"] and w.launcher.stops == ["a"]
    assert w.state("a") == "unloaded" and w.state("b") == "sleeping"
