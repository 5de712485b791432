"""The supervisor's one periodic wake-up (ticker.py): fast while something is time-bound, slow
at rest, poked awake when work begins; and the beat the children's output readers share."""

from __future__ import annotations

import asyncio
from pathlib import Path

from httpfakes import runtime
from polls import eventually
from swapper import ticker as ticker_mod
from swapper.ticker import FAST, SLOW, Pulse, Ticker


async def test_the_ticker_slows_down_at_rest_and_keeps_the_fast_pace_while_busy():
    busy = [True]
    ticks: list[float] = []
    loop = asyncio.get_running_loop()

    def work() -> bool:
        ticks.append(loop.time())
        return busy[0]

    t = Ticker(work, flush=lambda: None)
    task = asyncio.ensure_future(t.run())
    try:
        assert await eventually(lambda: len(ticks) >= 3)
        assert t.period == FAST
        busy[0] = False
        assert await eventually(lambda: t.period == SLOW)
        n = len(ticks)
        await asyncio.sleep(FAST * 2.5)  # a slow ticker does not tick at the fast pace
        assert len(ticks) <= n + 1
    finally:
        task.cancel()


async def test_a_poke_ticks_at_once_instead_of_after_the_slow_period():
    ticks: list[float] = []
    loop = asyncio.get_running_loop()
    t = Ticker(lambda: ticks.append(loop.time()) or False, flush=lambda: None)
    task = asyncio.ensure_future(t.run())
    try:
        assert await eventually(lambda: len(ticks) >= 1 and t.period == SLOW)
        n, poked_at = len(ticks), loop.time()
        t.poke()
        assert await eventually(lambda: len(ticks) > n, timeout=SLOW * 0.6)
        assert ticks[n] - poked_at < SLOW / 2
    finally:
        task.cancel()


async def test_a_poke_from_within_a_tick_keeps_the_fast_pace():
    t: Ticker

    def work() -> bool:
        t.poke()  # the tick's own rules began something time-bound (a start, say)
        return False

    t = Ticker(work, flush=lambda: None)
    task = asyncio.ensure_future(t.run())
    try:
        assert await eventually(lambda: t._poked)
        await asyncio.sleep(FAST * 1.5)
        assert t.period == FAST
    finally:
        task.cancel()


async def test_logs_are_flushed_on_every_tick_after_the_readers_it_woke():
    order: list[str] = []

    async def reader() -> None:
        while True:
            await ticker_mod.pulse.wait()
            order.append("read")

    t = Ticker(lambda: order.append("work") or False, flush=lambda: order.append("flush"))
    tasks = [asyncio.ensure_future(reader()), asyncio.ensure_future(t.run())]
    try:
        assert await eventually(lambda: order.count("flush") >= 2)
        first = order[:order.index("flush") + 1]
        assert first[-1] == "flush" and "read" in first and "work" in first
    finally:
        for task in tasks:
            task.cancel()


async def test_a_pulse_nobody_beats_still_wakes_its_waiters_after_the_fallback():
    p = Pulse(fallback=0.05)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await asyncio.wait_for(p.wait(), 5)
    assert loop.time() - t0 >= 0.04
    waiting = p.wait()
    p.beat()
    assert waiting.done(), "a beat wakes every waiter at once"


async def test_the_scheduler_pokes_the_ticker_when_a_request_must_wait(tmp_path: Path):
    rt, launcher = runtime(tmp_path)
    pokes: list[int] = []
    rt.scheduler.on_busy = lambda: pokes.append(1)
    async with rt.scheduler.acquire("a"):  # cold: a start, and a wait for it
        pass
    assert pokes, "a cold request pokes the ticker"
    n = len(pokes)
    async with rt.scheduler.acquire("a"):  # a ready model with a free slot: nothing time-bound
        pass
    assert len(pokes) == n
    assert rt.scheduler.tick() is False, "at rest once the request is done"
