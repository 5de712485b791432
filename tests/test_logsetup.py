"""swapper's log output: batched lines, and access lines that read as the formatter writes them."""

from __future__ import annotations

import io
import json
import logging
from typing import Iterator

import pytest

from swapper import logsetup
from swapper.activity import LogRing
from swapper.logsetup import JsonFormatter, TextFormatter, access_log, log_access, setup_logging


@pytest.fixture
def swapper_logging() -> Iterator[io.StringIO]:
    """swapper's own logging set up as `swapper serve` does, writing to a buffer."""
    root = logging.getLogger()
    saved = (root.level, logsetup._batch, logging.logThreads, logging.logProcesses,
             logging.logMultiprocessing, logging._srcfile)  # type: ignore[attr-defined]
    setup_logging("info", "text")
    buf = io.StringIO()
    assert logsetup._batch is not None
    logsetup._batch.stream = buf
    try:
        yield buf
    finally:
        for h in root.handlers[:]:
            if h is logsetup._batch or isinstance(h, LogRing):
                root.removeHandler(h)
        (level, logsetup._batch, logging.logThreads, logging.logProcesses,
         logging.logMultiprocessing, logging._srcfile) = saved  # type: ignore[attr-defined]
        root.setLevel(level)


def _only_swappers_handler(monkeypatch: pytest.MonkeyPatch) -> None:
    """The root logger as `swapper serve` has it (the test run adds capture handlers of its
    own), and proof that no log record is made for an access line."""
    monkeypatch.setattr(logging.getLogger(), "handlers", [logsetup._batch])

    def no_record(record: logging.LogRecord) -> None:
        raise AssertionError("an access line went through logging")

    monkeypatch.setattr(access_log, "handle", no_record)


@pytest.mark.parametrize("formatter", [TextFormatter(), JsonFormatter()], ids=["text", "json"])
def test_an_access_line_is_what_the_formatter_makes_of_the_record(formatter: logging.Formatter) -> None:
    message = "abc123 POST /v1/completions?x=%41 200 1.2ms"
    record = access_log.makeRecord(access_log.name, logging.INFO, "", 0, message, (), None,
                                   extra={"request_id": "abc123"})
    assert formatter.access_line(record.created, "abc123", message) == formatter.format(record)  # type: ignore[attr-defined]


def test_access_lines_are_batched_and_written_on_flush(swapper_logging: io.StringIO,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    _only_swappers_handler(monkeypatch)
    log_access("r1", "r1 POST /v1/completions 200 1.0ms")
    log_access("r2", "r2 POST /v1/completions 404 0.5ms")
    assert swapper_logging.getvalue() == "", "held for the batch"
    logsetup.flush_logs()
    lines = swapper_logging.getvalue().splitlines()
    assert [x.split(" ", 1)[1] for x in lines] == ["I swapper.access: r1 POST /v1/completions 200 1.0ms",
                                                   "I swapper.access: r2 POST /v1/completions 404 0.5ms"]


def test_a_warning_flushes_the_access_lines_before_it(swapper_logging: io.StringIO,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    _only_swappers_handler(monkeypatch)
    log_access("r1", "r1 POST /v1/completions 200 1.0ms")
    logging.getLogger("swapper.proxy").warning("upstream broke off")
    lines = swapper_logging.getvalue().splitlines()
    assert len(lines) == 2 and "r1 POST" in lines[0] and "upstream broke off" in lines[1]


def test_the_page_log_ring_does_not_stop_the_direct_access_line(swapper_logging: io.StringIO,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    _only_swappers_handler(monkeypatch)
    ring = LogRing(lambda kind, payload: None, loop=None)  # type: ignore[arg-type]
    logging.getLogger().addHandler(ring)
    log_access("r1", "r1 POST /v1/completions 200 1.0ms")
    logsetup.flush_logs()
    assert "r1 POST" in swapper_logging.getvalue()
    assert not ring.lines, "the page's ring never shows access lines"


def test_access_lines_reach_any_other_handler_as_log_records(swapper_logging: io.StringIO,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    assert any(h is not logsetup._batch for h in logging.getLogger().handlers), "the capture handler is there"
    with caplog.at_level("INFO", logger="swapper.access"):
        log_access("r9", "r9 GET /v1/models 200 0.3ms")
    records = [r for r in caplog.records if r.name == "swapper.access"]
    assert [r.getMessage() for r in records] == ["r9 GET /v1/models 200 0.3ms"]
    assert records[0].request_id == "r9"  # type: ignore[attr-defined]
    logsetup.flush_logs()
    assert "r9 GET" in swapper_logging.getvalue(), "and swapper's own handler still writes it"


def test_json_access_lines_carry_the_request_id(swapper_logging: io.StringIO,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    _only_swappers_handler(monkeypatch)
    assert logsetup._batch is not None
    logsetup._batch.setFormatter(JsonFormatter())
    log_access("r1", "r1 POST /v1/completions 200 1.0ms")
    logsetup.flush_logs()
    doc = json.loads(swapper_logging.getvalue())
    assert doc["logger"] == "swapper.access" and doc["request_id"] == "r1" and doc["level"] == "info"
    assert doc["message"] == "r1 POST /v1/completions 200 1.0ms"
