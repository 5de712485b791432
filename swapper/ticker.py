"""The supervisor's one periodic wake-up: time-based scheduler rules, log flushes, child output.

Why one, and why it slows down: every wake-up of an idle process costs it far more CPU than
the few microseconds of work it does (caches and the scheduler's switch back into a large
process), and on a box where the front shares cores with the engines that CPU comes out of
generation. Separate timers for the scheduler, the log batches and each child's output pipe
were twenty wake-ups a second with nothing to do; now there is one, every 0.1 s while the
scheduler has something time-bound (a queued request, a model starting, waiting for room or
draining), else every 0.5 s. Whatever makes the scheduler busy pokes the ticker, so a queued
request's timeout is never watched at the slow pace.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

log = logging.getLogger("swapper")

FAST = 0.1  # seconds between ticks while the scheduler has something time-bound
SLOW = 0.5  # seconds between ticks at rest (log lines and child output are at most this late)


class Pulse:
    """One wake-up shared by everything that polls (the children's output readers): they wait
    for the next beat instead of each keeping a timer of its own. If nothing beats (a child
    run without the ticker), a fallback timer does, `fallback` seconds after the first wait."""

    def __init__(self, fallback: float = 1.0):
        self.fallback = fallback
        self._fut: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None

    def wait(self) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        fut = self._fut
        if fut is None or fut.done() or fut.get_loop() is not loop:
            fut = self._fut = loop.create_future()
            self._timer = loop.call_later(self.fallback, self.beat)
        return fut

    def beat(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        fut, self._fut = self._fut, None
        if fut is not None and not fut.done() and not fut.get_loop().is_closed():
            fut.set_result(None)


pulse = Pulse()


class Ticker:
    """Calls `work` (which returns whether the scheduler is busy) at the fast or slow pace."""

    def __init__(self, work: Callable[[], bool], flush: Callable[[], None]):
        self.work = work
        self.flush = flush
        self.period = FAST
        self._poked = False
        self._sleep: asyncio.Future[None] | None = None

    def poke(self) -> None:
        """Something time-bound began: tick now, and fast from then on while it lasts."""
        self._poked = True
        if self.period != FAST:
            self.period = FAST
            if self._sleep is not None and not self._sleep.done():
                self._sleep.set_result(None)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._sleep = loop.create_future()
            timer = loop.call_later(self.period, _wake, self._sleep)
            try:
                await self._sleep
            finally:
                timer.cancel()
            pulse.beat()
            self._poked = False
            try:
                busy = self.work()
            except Exception:
                log.exception("scheduler tick failed")
                busy = True
            # a poke during the tick (a start its rules began) counts as busy too
            self.period = FAST if busy or self._poked else SLOW
            loop.call_soon(self.flush)  # after the output readers the beat woke have logged


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
