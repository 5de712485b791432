"""Connections to the children, pooled per address (the engine side of relay.py's exchanges)."""

from __future__ import annotations

import asyncio
import collections

from .relay import Exchange


class Upstreams:
    """Connections to the children, pooled per address.

    At most `limit` at once per child (each child's backend says how many it takes), idle ones
    included: an idle kept-alive connection holds one of llama-server's HTTP threads. Idle
    connections are not reused after `idle_timeout` (llama-server closes them after 5 s, and a
    close racing a reuse would cost a retry).
    """

    def __init__(self, limit: int, idle_timeout: float = 4.0):
        self.limit = limit
        self.idle_timeout = idle_timeout
        self._idle: dict[tuple[str, int], list[Exchange]] = {}
        self._busy: collections.Counter[tuple[str, int]] = collections.Counter()
        self._waiters: dict[tuple[str, int], collections.deque[asyncio.Future[None]]] = {}

    async def open(self, host: str, port: int, connect_timeout: float, fresh: bool = False,
                   limit: int | None = None) -> Exchange:
        """A connection to the child, idle one first (unless `fresh`); waits while `limit` (this
        child's own, else the pool's) are in use."""
        key = (host, port)
        limit = limit or self.limit
        loop = asyncio.get_running_loop()
        while True:
            idle = self._idle.get(key)
            if idle:
                now = loop.time()
                while idle and (idle[-1].closed or now - idle[-1].idle_since >= self.idle_timeout):
                    idle.pop().close()
                if idle and not fresh:
                    ex = idle.pop()
                    self._busy[key] += 1
                    ex._reset()
                    ex.reused = True
                    return ex
            if self._busy[key] + len(idle or ()) < limit:
                break
            if idle:  # drop the ones the child closed since they went idle, then count again
                idle[:] = [ex for ex in idle if not ex.closed]
                if self._busy[key] + len(idle) < limit:
                    break
            if idle:  # a fresh connection wanted and no room: the oldest idle one makes room
                idle.pop(0).close()
                continue
            fut = loop.create_future()
            self._waiters.setdefault(key, collections.deque()).append(fut)
            try:
                await fut
            except asyncio.CancelledError:
                if fut.done() and not fut.cancelled():
                    self._wake(key)  # pass on a wake-up this waiter can no longer use
                raise
        self._busy[key] += 1
        try:
            return await _connect(loop, host, port, connect_timeout)
        except BaseException:
            self._busy[key] -= 1
            self._wake(key)
            raise

    def release(self, host: str, port: int, ex: Exchange) -> None:
        """Back to the pool when the answer was complete and the child keeps the connection open."""
        key = (host, port)
        self._busy[key] -= 1
        if ex.reusable:
            ex.idle_since = asyncio.get_running_loop().time()
            self._idle.setdefault(key, []).append(ex)
        else:
            ex.close()
        self._wake(key)

    def close(self) -> None:
        for idle in self._idle.values():
            for ex in idle:
                ex.close()
        self._idle.clear()

    def _wake(self, key: tuple[str, int]) -> None:
        waiters = self._waiters.get(key)
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return


async def _connect(loop: asyncio.AbstractEventLoop, host: str, port: int, timeout: float) -> Exchange:
    """A new connection to a child, given up after `timeout` seconds (0: no limit).

    What `asyncio.timeout` does, without its objects and calls (~10 µs of CPU a connection in
    a microbenchmark), since every stream makes a new connection (llama-server closes it after
    each stream). The timer cancels this task; a cancellation that is the timer's alone
    becomes a TimeoutError.
    """
    factory = lambda: Exchange(loop)  # noqa: E731
    if not timeout:
        return (await loop.create_connection(factory, host, port))[1]  # type: ignore[return-value]
    task = asyncio.current_task(loop)
    assert task is not None
    fired = False

    def expire() -> None:
        nonlocal fired
        fired = True
        task.cancel()

    timer = loop.call_later(timeout, expire)
    try:
        return (await loop.create_connection(factory, host, port))[1]  # type: ignore[return-value]
    except asyncio.CancelledError:
        if fired and (not hasattr(task, "uncancel") or task.uncancel() == 0):  # 3.10: no count
            raise asyncio.TimeoutError(f"no connection to {host}:{port} within {timeout:g} s") from None
        raise
    finally:
        timer.cancel()
