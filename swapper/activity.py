"""What the control page streams besides model state: finished requests and recent log lines.

Both are bounded rings filled on the hot path (a proxied request finishing, a log record, a
line of child output), so recording is an append and a hand-off to the page's event hub; all
formatting happens when a page asks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any, Callable

from aiohttp import web

Publish = Callable[[str, Any], None]


@dataclass
class RequestRecord:
    time: float  # wall clock when it finished
    model: str
    route: str
    status: int
    queue_wait: float | None  # seconds until the scheduler granted the model
    ttft: float | None  # seconds to the first byte of the answer
    tokens: int | None  # completion tokens from the response's usage
    tokens_per_s: float | None  # completion tokens over the time after the first byte
    duration: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Activity:
    """The last N proxied requests."""

    def __init__(self, publish: Publish, size: int = 200):
        self.publish = publish
        self.recent: deque[RequestRecord] = deque(maxlen=size)

    def finished(self, request: web.Request, model: str, status: int, seconds: float) -> None:
        ttft = request.get("ttft")
        usage = request.get("usage") or {}
        tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
        tokens = tokens if isinstance(tokens, int) else None
        rate = None
        if tokens and ttft is not None and seconds - ttft > 1e-3:
            rate = tokens / (seconds - ttft)  # not rounded: the page formats it (round(x, 2) costs a dtoa)
        rec = RequestRecord(time.time(), model, request.path, status, request.get("queue_wait"), ttft,
                            tokens, rate, seconds)
        self.recent.append(rec)
        self.publish("request", rec)


@dataclass
class LogLine:
    time: float
    level: str
    name: str
    text: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class LogRing(logging.Handler):
    """swapper's own recent log lines, in memory (child output has its own per-model rings).

    Records can come from worker threads (prefetch, header reads), so they are handed to the
    event loop, which owns the page's subscribers.
    """

    SKIP = ("swapper.access", "swapper.child", "aiohttp.access")
    skips_access = True  # logsetup.log_access may write access lines without it

    def __init__(self, publish: Publish, loop: asyncio.AbstractEventLoop, size: int = 500):
        super().__init__(logging.INFO)
        self.publish = publish
        self.loop = loop
        self.lines: deque[LogLine] = deque(maxlen=size)

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith(self.SKIP):
            return
        try:
            line = LogLine(record.created, record.levelname, record.name, record.getMessage())
        except Exception:
            return
        self.lines.append(line)
        try:
            self.loop.call_soon_threadsafe(self.publish, "log", line)
        except RuntimeError:  # the loop is closed: swapper is exiting
            pass


class ChildLogs:
    """Each model's recent child output, kept across restarts so a failed start stays readable."""

    def __init__(self, publish: Publish, size: int = 300, watched: Callable[[], bool] = lambda: True):
        self.publish = publish
        self.watched = watched  # whether any page listens (else nothing is published)
        self.size = size
        self.lines: dict[str, deque[str]] = {}

    def add(self, model: str, lines: list[str]) -> None:
        """A batch of a model's output lines (process.line_hooks)."""
        ring = self.lines.get(model)
        if ring is None:
            ring = self.lines[model] = deque(maxlen=self.size)
        ring.extend(lines)
        if self.watched():
            for text in lines:
                self.publish("mlog", (model, text))

    def tail(self, model: str) -> list[str]:
        return list(self.lines.get(model, ()))
