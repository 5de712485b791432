"""A stream's pieces relayed by a thread of their own (swapper/_pump.c), and the way back.

Why: relayed by the event loop, every streamed token costs a wake-up, a callback and a few
Python calls; the pump costs a `poll`, a `recv` and a `send` in a thread that holds no lock
(bench/PROFILE.md has the numbers). relay.py's `Exchange` starts one when a stream's answer ends
with its connection and the client is front.py's (a plain TCP socket): both transports stop
reading, the pump owns both sockets until it stops, and then relay.py carries on from the framing
state it reports, for whatever the pump left: a piece it did not read strictly, a client that
could not take a piece at once, a client or child that closed, a silent child, and the
piece that ends the answer (so the request is over before the client has the whole answer,
as when the event loop relays it).

Without the compiled module (no C compiler where swapper was installed), or with
`SWAPPER_PUMP=0` in the environment, every stream is relayed in Python as before.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .framing import BrokenAnswer, SilentUpstream

try:
    from . import _pump
except ImportError:  # not built: the event loop relays every stream
    _pump = None  # type: ignore[assignment]

log = logging.getLogger("swapper.proxy")
AVAILABLE = _pump is not None and os.environ.get("SWAPPER_PUMP", "1") != "0"

if _pump is not None:
    HANDBACK, BLOCKED, CLIENT, EOF, ERROR, SILENT, STOPPED = (
        _pump.HANDBACK, _pump.BLOCKED, _pump.CLIENT, _pump.EOF, _pump.ERROR, _pump.SILENT,
        _pump.STOPPED)


@dataclass
class Outcome:
    """Where the pump stopped, and what it leaves to the event loop."""

    result: int
    error: int
    rest: bytes  # HANDBACK: a piece not passed on; BLOCKED: what the client did not take yet
    tail: bytes  # the payload's last bytes (the usage record is in them)
    state: int  # the chunk framing: relay.py's _SIZE ... _TRAILER
    left: int
    line: bytes
    pieces: int  # passed on by the pump


class Pumped:
    """One stream under a pump: the client's transport, whether it was reading, and the pump."""

    __slots__ = ("pump", "client", "client_was_reading")

    def __init__(self, upstream: asyncio.Transport, client: asyncio.Transport, timeout: float,
                 state: int, left: int, line: bytes, on_stop: Any):
        up = upstream.get_extra_info("socket").fileno()
        down = client.get_extra_info("socket").fileno()
        self.pump = _pump.Pump(up, down, timeout, state, left, line, on_stop)
        self.client = client
        is_reading = getattr(client, "is_reading", None)
        self.client_was_reading = is_reading() if is_reading is not None else True
        self.pump.start()  # it reads nothing before this callback returns to the event loop
        upstream.pause_reading()
        if self.client_was_reading:
            client.pause_reading()

    def outcome(self, stop: bool = False) -> Outcome:
        """Waits for the pump's thread (asking it to stop first if `stop`), gives the client's
        socket back to the event loop, and says where the stream is. The child's is read again
        only if the stream goes on (`Pumping._pump_over`)."""
        if stop:
            self.pump.stop()
        self.pump.join()
        out = Outcome(*self.pump.outcome())
        if self.client_was_reading and not self.client.is_closing():
            self.client.resume_reading()
        return out


def can_pump(upstream: asyncio.Transport | None, client: Any) -> bool:
    """Whether a stream between these two transports may go to a pump now: both are open, and
    the client has taken every byte written to it so far (the pump writes after). Both are plain
    TCP sockets: swapper's port speaks no TLS of its own."""
    return (AVAILABLE and upstream is not None and client is not None and not client.is_closing()
            and not upstream.is_closing() and client.get_write_buffer_size() == 0)


class Pumping:
    """relay.py's `Exchange`, as far as it hands a stream to a pump and takes it back.

    `direct(write, client)` asks for a pump; it starts once the piece under way is read
    (`_start_pump`, soon after), and ends in `_pump_over`, called on the event loop when the
    pump's thread stops or by `halt` before a socket of the stream is closed.
    """

    _pumped: Pumped | None
    # the rest is Exchange's (relay.py)
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport | None
    closed: bool
    done: asyncio.Future[None]
    _pending: list[bytes] | None
    _payload: Any
    _direct: Any
    _chunk_state: int
    _left: int
    _line: bytes
    _timeout: float
    _last: float
    _settled: int
    _watch: asyncio.TimerHandle | None

    def halt(self) -> None:
        """Stop a pump under way and take the stream back (before a socket of it is closed)."""
        if self._pumped is not None:
            self._pump_over(stop=True)

    def _start_pump(self, client: asyncio.Transport) -> None:
        if self._pending:  # pieces that came in the same turn of the loop
            self.settle()
        if self._pending is None or self.closed or self.done.done() or not can_pump(self.transport, client):
            return  # the event loop relays the stream
        try:
            self._pumped = Pumped(self.transport, client, self._timeout, self._chunk_state,  # type: ignore[arg-type]
                                  self._left, self._line, self._pump_stopped)
        except OSError as e:  # no thread to be had: the event loop relays it
            log.warning("a stream stays on the event loop: %s", e)
            return
        self._stop_watch()  # the pump keeps the read timeout

    def _pump_stopped(self) -> None:
        """Called in the pump's thread as it ends (unless `halt` took the stream back already,
        when the loop may be gone)."""
        if self._pumped is not None:
            self.loop.call_soon_threadsafe(self._pump_over)

    def _pump_over(self, stop: bool = False) -> None:
        """The stream back from the pump: its failure, or the rest to relay here (its end among it)."""
        pumped, self._pumped = self._pumped, None
        if pumped is None:
            return
        out = pumped.outcome(stop)
        self._settled += out.pieces
        if out.tail and self._payload is not None:
            self._payload(out.tail)
        self._chunk_state, self._left, self._line = out.state, out.left, out.line
        result = out.result
        if result == EOF:
            self._end_of_stream(None)
        elif result == ERROR:
            self._fail(BrokenAnswer(f"connection closed inside the answer ({os.strerror(out.error)})"))
        elif result == SILENT:
            self._fail(SilentUpstream(f"no answer for {self._timeout:g} s"))
        elif result != STOPPED and not stop:  # the event loop carries on
            self._last = time.monotonic()
            if self._timeout > 0:
                self._watch = self.loop.call_later(self._timeout / 4, self._check_silence)
            if out.rest:
                if result == BLOCKED:  # read already: only the client has yet to take it
                    self._direct(out.rest)
                else:
                    self.data_received(out.rest)  # usually the answer's end
        if not self.done.done() and not self.closed:  # more to read from the child
            self.resume()

    if TYPE_CHECKING:  # Exchange's
        def settle(self) -> None: ...
        def resume(self) -> None: ...
        def _stop_watch(self) -> None: ...
        def _check_silence(self) -> None: ...
        def _end_of_stream(self, exc: BaseException | None) -> None: ...
        def _fail(self, exc: BaseException) -> None: ...
        def data_received(self, data: bytes) -> None: ...
