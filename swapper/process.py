"""A child server process: spawn under a keeper, poll health, keep a log tail, stop cleanly.

Each child runs as `python -S -E keeper.py -- ENGINE ARGS...` (see keeper.py for why: no
orphans, even when swapper is SIGKILLed or the engine forks workers). The keeper makes itself a
process group of its own first thing, but stays in swapper's session: with the kernel's session
autogroups (on by default) a session of its own would make each engine a scheduling group of its
own, which on a busy host generated 2-4x slower than the same llama-server started from
swapper's session. (The group is set by the keeper, not from here: once the keeper has exec'd,
which it has when the spawn returns, only it may change its own group.)
Stopping sends SIGTERM to the keeper, which passes it on and SIGKILLs leftovers after the grace
period; if the keeper itself does not exit in time, its whole process group is SIGKILLed.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import re
import signal
import socket
import sys
import time
from collections import deque
from typing import Callable

import aiohttp

from . import keeper as _keeper
from .keeper import descendants
from .ticker import pulse

KEEPER = _keeper.__file__

log = logging.getLogger("swapper.process")
child_log = logging.getLogger("swapper.child")

# called with (child name, lines) for each batch of child output lines (the control page's live
# logs); runs on the event loop, so a hook must be cheap and must not block
line_hooks: list[Callable[[str, list[str]], None]] = []
# a line of child output that is logged whatever the child's state: an ` E ` level (the second
# word of llama.cpp's lines), ERROR, a Python traceback
_ALARM = re.compile(r"^[^ \n]* E |ERROR|Traceback", re.M)
PIPE_SIZE = 1 << 20


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (the child binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def raise_nofile_limit() -> tuple[int, int]:
    """Raise the open-files soft limit to the hard limit: every proxied stream holds sockets."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft, hard


def _read_available(fd: int) -> tuple[bytes, bool]:
    """What the pipe holds now, and whether its writers are all gone."""
    parts: list[bytes] = []
    for _ in range(PIPE_SIZE >> 16):
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            return b"".join(parts), False
        except OSError:
            return b"".join(parts), True
        if not chunk:
            return b"".join(parts), True
        parts.append(chunk)
    return b"".join(parts), False


def _line_level(text: str, healthy: bool) -> int:
    """The log level for one line of child output (every line also goes to the tail).

    Until the child is healthy everything shows (INFO; warnings and errors at their level): that
    is when a misconfigured model says why. Once it serves, only its errors show; its
    per-request chatter — several lines a request, llama.cpp's ` W ` cache notes among them —
    goes to DEBUG, because re-logging it costs the proxy CPU that the engine needs.
    """
    if _ALARM.search(text) is not None:  # an ` E ` level, ERROR, a traceback
        return logging.ERROR
    if healthy:
        return logging.DEBUG
    level = text.split(" ", 2)[1] if text.count(" ") >= 2 else ""
    if level == "W" or "WARNING" in text:
        return logging.WARNING
    return logging.INFO


class ChildExited(Exception):
    def __init__(self, code: int | None, tail: list[str]):
        super().__init__(f"exited with status {code}")
        self.code = code
        self.tail = tail


class ChildProcess:
    """One engine process tree, owned by swapper."""

    # how often to poll health while it starts: (for the first seconds, every ...); an engine's
    # output (it says when it is ready) or its exit polls at once
    POLL: tuple[tuple[float, float], ...] = ((2.0, 0.01), (10.0, 0.1), (float("inf"), 0.25))

    def __init__(self, name: str, argv: list[str], env: dict[str, str] | None = None,
                 cwd: str | None = None, grace: float = 10.0, tail_lines: int = 200,
                 on_exit: Callable[[int | None], None] | None = None):
        self.name = name
        self.argv = argv
        self.env = env
        self.cwd = cwd
        self.grace = grace
        self.tail: deque[str] = deque(maxlen=tail_lines)
        self.on_exit = on_exit
        self.proc: asyncio.subprocess.Process | None = None
        self.returncode: int | None = None
        self.stopping = False
        self._reader: asyncio.Task | None = None
        self._waiter: asyncio.Task | None = None
        self.exited = asyncio.Event()
        self.started_at = 0.0
        self.healthy = False
        self._nudge: asyncio.Future[None] | None = None  # wait_healthy's wait: output or exit ends it

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def pids(self) -> list[int]:
        """The keeper and every process below it (engines may fork workers)."""
        if self.proc is None or self.returncode is not None:
            return []
        return [self.proc.pid, *descendants(self.proc.pid)]

    async def start(self) -> None:
        # the keeper needs only the standard library: -S -E skips site-packages and the
        # environment's hooks, which halves its start-up
        keeper = [sys.executable, "-S", "-E", KEEPER, "--grace", str(self.grace),
                  "--parent", str(os.getpid()), "--"]
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        self.started_at = time.monotonic()
        log.debug("starting %s: %s", self.name, " ".join(self.argv))
        out, into = os.pipe()
        try:
            with contextlib.suppress(OSError, AttributeError):  # room for bursts between pulls
                fcntl.fcntl(into, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
            self.proc = await asyncio.create_subprocess_exec(
                *keeper, *self.argv, stdin=asyncio.subprocess.DEVNULL, stdout=into,
                stderr=asyncio.subprocess.STDOUT, env=env, cwd=self.cwd)
        except BaseException:
            os.close(out)
            raise
        finally:
            os.close(into)
        os.set_blocking(out, False)
        self._reader = asyncio.create_task(self._read_output(out), name=f"log:{self.name}")
        self._waiter = asyncio.create_task(self._wait(), name=f"wait:{self.name}")

    async def _read_output(self, fd: int) -> None:
        """The child's output: as it comes until the child serves, then pulled on the ticker's
        beat (ticker.py: every 0.1-0.5 s, in the wake-up the supervisor has anyway).

        A serving llama-server writes about ten lines for each request, one `write` each:
        reading them as they come would wake the proxy several times per request. The pipe is
        enlarged so that the child never waits on it between pulls.
        """
        loop = asyncio.get_running_loop()
        partial = b""
        try:
            while True:
                data, eof = _read_available(fd)
                if data:
                    whole, _, partial = (partial + data).rpartition(b"\n")
                    if len(partial) > 1 << 20:  # a "line" with no end in sight: show what there is
                        whole, partial = whole + b"\n" + partial, b""
                    if whole:
                        self._lines(whole.decode(errors="replace"))
                if eof:
                    if partial:
                        self._lines(partial.decode(errors="replace"))
                    return
                if len(data) >= PIPE_SIZE // 4:  # a burst: read on soon, but let the loop run
                    await asyncio.sleep(0)
                elif self.healthy:
                    await pulse.wait()
                else:
                    ready = loop.create_future()
                    loop.add_reader(fd, ready.set_result, None)
                    try:
                        await ready
                    finally:
                        loop.remove_reader(fd)
        finally:
            os.close(fd)

    def _lines(self, text: str) -> None:
        """A batch of whole lines: kept, shown to the hooks, logged at their level.

        A serving child's batch is handled as one piece unless it holds an error: its lines
        all go to DEBUG (`_line_level`), so with DEBUG off nothing is logged line by line.
        """
        lines = [line for line in map(str.rstrip, text.split("\n")) if line]
        if not lines:
            return
        self._wake_poll()
        self.tail.extend(lines)
        name = self.name
        for hook in line_hooks:
            hook(name, lines)
        healthy = self.healthy
        if healthy and not child_log.isEnabledFor(logging.DEBUG) and _ALARM.search(text) is None:
            return
        for line in lines:
            level = _line_level(line, healthy)
            if child_log.isEnabledFor(level):
                child_log.log(level, "[%s] %s", name, line)

    async def _wait(self) -> None:
        assert self.proc is not None
        code = await self.proc.wait()
        if self._reader is not None and not self.healthy:
            # a start that failed: its last lines say why, so let the reader catch up; a child
            # that served is reported at once (no request may be sent to it meanwhile)
            with contextlib.suppress(asyncio.TimeoutError, Exception):
                await asyncio.wait_for(asyncio.shield(self._reader), 1.0)
        self.returncode = code
        self.exited.set()
        self._wake_poll()
        if not self.stopping:
            log.warning("%s exited with status %s", self.name, code)
            if self.on_exit is not None:
                self.on_exit(code)

    async def wait_healthy(self, url: str, timeout: float, session: aiohttp.ClientSession,
                           ok: Callable[[int], bool] = lambda s: s == 200) -> None:
        """Poll `url` until it answers OK; raise ChildExited or TimeoutError."""
        t0 = time.monotonic()
        deadline = t0 + timeout
        loop = asyncio.get_running_loop()
        try:
            while True:
                if self.exited.is_set():
                    raise ChildExited(self.returncode, list(self.tail))
                # armed before the poll: output while it is under way polls again at once
                nudge = self._nudge = loop.create_future()
                try:
                    async with session.get(url, timeout=aiohttp.ClientTimeout(total=2.0)) as r:
                        if ok(r.status):
                            self.healthy = True
                            return
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
                    pass
                now = time.monotonic()
                if now >= deadline:
                    raise asyncio.TimeoutError(f"{self.name} not healthy after {timeout:g}s")
                # small models are up in tens of milliseconds: poll tightly at first, then back off
                delay = next(d for until, d in self.POLL if now - t0 < until)
                try:
                    await asyncio.wait_for(nudge, delay)
                except asyncio.TimeoutError:
                    pass
        finally:
            self._nudge = None

    def _wake_poll(self) -> None:
        if self._nudge is not None and not self._nudge.done():
            self._nudge.set_result(None)

    async def stop(self, grace: float | None = None) -> int | None:
        """SIGTERM the tree (via the keeper), SIGKILL the group if it lingers."""
        if self.proc is None:
            return None
        self.stopping = True
        grace = self.grace if grace is None else grace
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.exited.wait(), grace + 5.0)
            except asyncio.TimeoutError:
                log.warning("%s did not stop in %.0fs; killing its process group", self.name, grace + 5)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.exited.wait(), 5.0)
        return self.returncode

    def kill_now(self) -> None:
        """Last resort at interpreter exit: signal the keeper, which takes the tree down."""
        if self.proc is not None and self.returncode is None:
            self.stopping = True
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGTERM)
