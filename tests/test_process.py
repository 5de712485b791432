"""Child output: everything kept in the tail, but only what an operator needs logged."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
import textwrap

import aiohttp

from swapper import process
from swapper.process import ChildExited, ChildProcess, _line_level


def test_startup_lines_show_and_serving_chatter_goes_to_debug():
    assert _line_level("0.00.004 I srv  load_model: loading model 'x.gguf'", healthy=False) == logging.INFO
    assert _line_level("0.00.003 W srv  llama_server: no API key is set", healthy=False) == logging.WARNING
    assert _line_level("0.06.121 W slot operator(): need to evaluate at least 1 token", healthy=True) == logging.DEBUG
    assert _line_level("0.06.013 I slot print_timing: eval time = 5.95 ms", healthy=True) == logging.DEBUG
    assert _line_level("0.07.000 E srv  send_error: task 3 failed", healthy=True) == logging.ERROR
    assert _line_level("ERROR 11-23 engine core died", healthy=True) == logging.ERROR


async def test_a_child_that_dies_during_start_reports_its_status_and_last_lines(caplog):
    caplog.set_level(logging.INFO, logger="swapper.child")
    code = "import sys; print('loading weights', flush=True); print('bad magic', file=sys.stderr); sys.exit(3)"
    child = ChildProcess("broken", [sys.executable, "-c", code], grace=1.0)
    await child.start()
    async with aiohttp.ClientSession() as session:
        try:
            await child.wait_healthy("http://127.0.0.1:9/health", 30, session)
            raise AssertionError("a dead child is never healthy")
        except ChildExited as e:
            assert e.code == 3
            assert e.tail[-2:] == ["loading weights", "bad magic"]
    await asyncio.wait_for(child.exited.wait(), 5)
    assert "[broken] loading weights" in caplog.text


async def test_a_child_gets_a_process_group_of_its_own_in_swappers_session():
    """Its own group, so that stopping it can signal the whole tree; swapper's session, so that
    the kernel's session autogroups do not schedule every engine as a group of its own."""
    code = "import os, time; print(os.getpgid(0), os.getsid(0), flush=True); time.sleep(30)"
    child = ChildProcess("grouped", [sys.executable, "-c", code], grace=1.0)
    await child.start()
    try:
        for _ in range(500):
            if child.tail:
                break
            await asyncio.sleep(0.02)
        assert child.proc is not None and child.tail, "the child printed its group and session"
        keeper = child.proc.pid
        engine_group, engine_session = (int(x) for x in child.tail[0].split())
        assert os.getpgid(keeper) == keeper, "the keeper leads a group of its own"
        assert os.getsid(keeper) == os.getsid(0) == engine_session, "in swapper's session"
        assert engine_group not in (os.getpgid(0), keeper), "the engine's group is the keeper's own child group"
    finally:
        await child.stop(1.0)
    assert child.returncode is not None


LINES = [
    "0.06.121 W slot operator(): need to evaluate at least 1 token",
    "0.06.013 I slot print_timing: eval time = 5.95 ms",
    "0.07.000 E srv  send_error: task 3 failed",
    " E leading space",
    "ERROR 11-23 engine core died",
    "Traceback (most recent call last):",
    "0.07.001 I srv  done, no Errors here",
    "E",
    "x E",
    "a b E c",
]


def test_a_batch_holds_an_error_exactly_when_one_of_its_lines_is_one():
    from swapper.process import _ALARM
    errors = {LINES[2], LINES[3], LINES[4], LINES[5]}  # an ` E ` level word, ERROR, a traceback
    for line in LINES:
        assert (_line_level(line, healthy=True) == logging.ERROR) == (line in errors), line
    text = "\n".join(LINES[:2]) + "\n"
    assert _ALARM.search(text) is None
    assert _ALARM.search(text + LINES[2] + "\n") is not None


def test_a_serving_childs_batch_is_kept_and_only_its_errors_are_logged(caplog):
    seen: list[tuple[str, list[str]]] = []
    hook = lambda name, lines: seen.append((name, lines))  # noqa: E731
    child = ChildProcess("m", ["true"])
    child.healthy = True
    process.line_hooks.append(hook)
    try:
        with caplog.at_level(logging.INFO, logger="swapper.child"):
            child._lines("\n".join(LINES[:2]) + "\n\n  \n")
            assert not caplog.records, "a serving child's chatter is not logged"
            child._lines(LINES[1] + "\r\n" + LINES[2] + "\n")
    finally:
        process.line_hooks.remove(hook)
    assert [r.getMessage() for r in caplog.records] == ["[m] " + LINES[2]]
    assert list(child.tail) == [LINES[0], LINES[1], LINES[1], LINES[2]], "every non-empty line kept, line ends stripped"
    assert seen == [("m", LINES[:2]), ("m", [LINES[1], LINES[2]])], "hooks get each batch"


async def test_health_is_polled_as_soon_as_a_starting_child_prints(tmp_path):
    """An engine says when it is ready: a line of output polls its health at once, not at the
    next tick of the poll's back-off (here a minute), even a line printed while a poll is under
    way."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    script = tmp_path / "engine.py"
    script.write_text(textwrap.dedent(f"""
        import http.server
        class H(http.server.BaseHTTPRequestHandler):
            ready = False
            def do_GET(self):
                self.send_response(200 if H.ready else 503)  # loading until it has been asked once
                self.send_header("Content-Length", "0")
                self.end_headers()
                self.wfile.flush()
                if not H.ready:
                    H.ready = True
                    print("ready", flush=True)
            def log_message(self, *a):
                pass
        server = http.server.HTTPServer(("127.0.0.1", {port}), H)
        print("listening", flush=True)
        server.serve_forever()
    """))
    child = ChildProcess("engine", [sys.executable, str(script)], grace=1.0)
    child.POLL = ((float("inf"), 60.0),)
    await child.start()
    try:
        async with aiohttp.ClientSession() as session:
            await asyncio.wait_for(child.wait_healthy(f"http://127.0.0.1:{port}/health", 30, session), 20)
        assert child.healthy
    finally:
        await child.stop()
