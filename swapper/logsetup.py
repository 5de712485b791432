"""swapper's log output: one line per record on stderr, as text or JSON, written in batches.

There is an access line for every request, so a `write` per record would be a system call on
the proxy's hot path: lines are collected and written together — with the next line once the
first has waited 0.1 s, or by the ticker within 0.5 s (ticker.py) — at once for warnings and
errors, and at exit.

The access line itself skips the `logging` machinery (`log_access`) while swapper's own
handler is the only one that takes it: a `LogRecord`, the logger's and each handler's filters
and locks, for a line whose fields are known. Run cold on a core the engine shares, that
machinery cost a proxied request more than the line is worth; the line written is the one the
formatter would have made. With any other handler or filter in place (a test's log capture,
an embedding application's logging), access lines go through `logging` as every other record.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, TextIO

access_log = logging.getLogger("swapper.access")

FLUSH_AFTER = 0.1
FLUSH_LINES = 256


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"), "level": record.levelname.lower(),
                               "logger": record.name, "message": record.getMessage()}
        swap = getattr(record, "swap", None)
        if swap:
            doc["swap"] = swap
        rid = getattr(record, "request_id", None)
        if rid:
            doc["request_id"] = rid
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc)

    def access_line(self, created: float, rid: str, message: str) -> str:
        """What `format` makes of an access record."""
        return json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S", self.converter(created)), "level": "info",
                           "logger": access_log.name, "message": message, "request_id": rid})


class TextFormatter(logging.Formatter):
    """`HH:MM:SS L name: message`, the clock formatted once a second."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname).1s %(name)s: %(message)s", "%H:%M:%S")
        self._second = -1
        self._clock = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        return self._clock_at(record.created)

    def _clock_at(self, created: float) -> str:
        second = int(created)
        if second != self._second:
            self._second, self._clock = second, time.strftime("%H:%M:%S", time.localtime(second))
        return self._clock

    def access_line(self, created: float, rid: str, message: str) -> str:
        """What `format` makes of an access record."""
        return f"{self._clock_at(created)} I {access_log.name}: {message}"


class BatchedStreamHandler(logging.StreamHandler):
    """A `StreamHandler` that writes its lines in batches (see the module's docstring)."""

    def __init__(self, stream: TextIO):
        super().__init__(stream)
        self.lines: list[str] = []
        self.since = 0.0

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self.add(line, record.created, record.levelno >= logging.WARNING)

    def add(self, line: str, created: float, urgent: bool = False) -> None:
        lines = self.lines
        if not lines:
            self.since = created
        lines.append(line)
        if urgent or len(lines) >= FLUSH_LINES or created - self.since >= FLUSH_AFTER:
            self.flush()

    def flush(self) -> None:
        self.acquire()
        try:
            if self.lines:
                text = "\n".join(self.lines) + "\n"
                self.lines.clear()
                try:
                    self.stream.write(text)
                except Exception:
                    pass
            if self.stream and hasattr(self.stream, "flush"):
                self.stream.flush()
        finally:
            self.release()


_batch: BatchedStreamHandler | None = None  # the handler setup_logging installed


def log_access(rid: str, message: str) -> None:
    """An access line (the caller has checked that INFO is enabled for `swapper.access`)."""
    h = _batch
    root = logging.root
    if (h is not None and not access_log.handlers and not access_log.filters and access_log.propagate
            and not root.filters and not h.filters and h.level <= logging.INFO):
        for other in root.handlers:
            if other is not h and not getattr(other, "skips_access", False):
                break
        else:
            created = time.time()
            h.add(h.formatter.access_line(created, rid, message), created)  # type: ignore[union-attr]
            return
    access_log.info(message, extra={"request_id": rid})


def flush_logs() -> None:
    """Write what the batching handlers hold (the ticker calls this on every tick)."""
    for h in logging.getLogger().handlers:
        if isinstance(h, BatchedStreamHandler) and h.lines:
            h.flush()


def setup_logging(level: str, fmt: str) -> None:
    handler = BatchedStreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    # what no formatter here shows is not collected for every record (the logging HOWTO's
    # "Optimization" section): one access line per request is on the hot path
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    global _batch
    _batch = handler
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
