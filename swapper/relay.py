"""The hop to a child, below the HTTP library: an HTTP/1.1 exchange that relays bytes as they come.

Hand-written on purpose. aiohttp's client de-chunks every answer into a `StreamReader` (a future
and a re-armed read timer per chunk) and its server re-chunks it through `StreamResponse.write`
(a coroutine and a drain per chunk): for a streamed token that machinery cost more than
llama.cpp's whole C++ router spends on it (bench/PROFILE.md). Here the child's bytes go from this
connection's `data_received` to the client's transport in the same callback, framing included;
only the status line, the headers and the chunk sizes are read. The children are loopback
servers we started (llama-server, vLLM), so the HTTP spoken to them is the plain subset they
speak: one request at a time per connection, `Content-Length` or chunked answers, or answers
that end when the connection does. upstreams.py pools the connections; downstream.py writes the
client's side.
"""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Callable

from .framing import (CHUNKED, LENGTH, UNTIL_CLOSE, BrokenAnswer, Head, NoAnswer, SilentUpstream,
                      UpstreamError, parse_head, whole_chunks)
from .pumping import Pumped, Pumping

Sink = Callable[[bytes], None]

# where a chunked body is
_SIZE, _DATA, _DATA_END, _TRAILER, _END = range(5)
MAX_HEAD = 64 << 10  # an answer's status line and headers
SETTLE_EVERY = 64  # pieces of a stream handed on before their framing is read (see Exchange.direct)
_CR = 13  # a piece whose fourth byte from the end is CR may end with CR LF CR LF, as every chunked body does
_monotonic = time.monotonic


class Exchange(Pumping, asyncio.Protocol):
    """One connection to a child, carrying one request and its answer at a time.

    `head` resolves with the answer's status and headers; `attach` then gives the sinks for
    its body: `raw` gets the bytes as framed on the wire, `payload` the body itself (chunk
    framing removed); `done` resolves when the answer is complete.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self.reused = False
        self._reset()

    def _reset(self) -> None:
        self.method = "GET"
        self.head: asyncio.Future[Head] = self.loop.create_future()
        self.done: asyncio.Future[None] = self.loop.create_future()
        self._head_buf = b""
        self._in_head = True
        self._early: list[bytes] = []
        self._lost: BaseException | None = None
        self._raw: Sink | None = None
        self._payload: Sink | None = None
        self._attached = False
        self._streaming = False
        self._direct: Sink | None = None
        self._pending: list[bytes] | None = None  # handed on, framing not read yet (see `direct`)
        self._framing = LENGTH
        self._left = 0
        self._chunk_state = _SIZE
        self._line = b""
        self._reusable = False
        self._keep = True
        self._timeout = 0.0
        self._last = 0.0
        self._settled = 0  # pieces of `_pending` whose framing was read (they count as activity)
        self._seen = 0
        self._watch: asyncio.TimerHandle | None = None
        self._pumped: Pumped | None = None

    # ------------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        pending = self._pending
        if pending is not None:  # a stream that ends with its connection: the path of its tokens
            self._direct(data)  # type: ignore[misc]
            pending.append(data)
            if len(data) < 4 or data[-4] == _CR or len(pending) >= SETTLE_EVERY:
                self.settle()  # this piece may end the answer: find out now
            return
        direct = self._direct
        if direct is not None:  # a stream handed on as it is: the path every streamed token takes
            direct(data)
            self._last = _monotonic()
            if self._chunk_state == _SIZE and not self._line:  # the usual piece: one whole chunk
                eol = data.find(b"\r\n")
                try:
                    size = int(data[:eol], 16) if eol > 0 else 0
                except ValueError:
                    size = 0
                if size and len(data) == eol + size + 4 and data.endswith(b"\r\n"):
                    if self._payload is not None:
                        self._payload(data[eol + 2:-2])
                    return
            self._chunks(data)
            return
        self._last = _monotonic()
        if self._streaming:  # a chunked body under way: the path every streamed token takes
            if self._raw is not None:
                self._raw(data)
            self._chunks(data)
            return
        if self._in_head:
            data = self._read_head(data)
            if not data:
                return
        if self._attached:
            self._body(data)
        elif not self.done.done():
            self._early.append(data)
        else:  # bytes after a complete answer: this connection cannot be trusted again
            self._reusable = False
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._pending:
            self.settle()
        self._direct = None
        self._pending = None
        self._stop_watch()
        if not self.head.done():
            self.head.set_exception(NoAnswer(f"connection closed before the status line ({exc or 'EOF'})"))
            self.head.exception()  # retrieved here: the caller may already have given up
        elif not self._attached:
            self._lost = exc or EOFError()
        else:
            self._end_of_stream(exc)

    # ------------------------------------------------------------------ the exchange

    def send(self, method: str, request: bytes, read_timeout: float, keep_alive: bool = True) -> None:
        """Write a whole request; `keep_alive=False` when it asked the child to close after it."""
        self.method = method
        self._keep = keep_alive
        self._timeout = read_timeout
        self._last = _monotonic()
        if read_timeout > 0:
            self._watch = self.loop.call_later(read_timeout, self._check_silence)
        assert self.transport is not None
        self.transport.write(request)

    def direct(self, write: Sink, client: asyncio.Transport | None = None) -> None:
        """From now on hand each piece straight to `write` (the client's transport), which the
        caller has made safe to call: back-pressure and a client that leaves are its business.
        Given the client's transport, the stream goes to a pump (pumping.py) once the piece
        under way is read, where it can.

        When the child closes the connection after this answer (a stream: llama-server does,
        and swapper asks it to), the pieces' chunk framing is read in batches, not piece by
        piece: after any piece that may be the answer's last (every chunked body ends with a
        blank line, so a piece that ends with one, or is shorter than one), every
        `SETTLE_EVERY` pieces, and when the connection ends. The end is found in the same
        callback as before, so the client never holds a whole answer the relay has not seen
        end; a streamed token (an SSE event ends with a bare blank line, inside its chunk) costs
        a `write` and an `append`. Nor is each piece timed: the read timeout's watchdog counts
        the pieces instead, looking four times per timeout, so a silence is found within 1.25
        timeouts.
        """
        if self._streaming and not self.closed:
            self._direct = write
            if not self._reusable:
                self._pending = []
                if client is not None:
                    self.loop.call_soon(self._start_pump, client)
                if self._watch is not None:
                    self._watch.cancel()
                    self._watch = self.loop.call_later(self._timeout / 4, self._check_silence)

    def settle(self) -> None:
        """Read the framing (and payload) of the pieces handed on since the last time: as one
        buffer, split at its line ends in C (`whole_chunks`) when it is what a streaming engine
        sends, else walked chunk by chunk."""
        pending, self._pending = self._pending or [], []
        if not pending:
            return
        self._settled += len(pending)
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        if self._chunk_state == _SIZE and not self._line:
            split = whole_chunks(data)
            if split is not None:
                payloads, last = split
                if self._payload is not None:
                    collections.deque(map(self._payload, payloads), 0)  # each, in C
                if last:
                    self._chunk_state = _END
                    self._finish()
                return
        self._chunks(data)

    def attach(self, raw: Sink | None, payload: Sink | None) -> None:
        """Start delivering the body: bytes that came with the head first, then as they arrive."""
        self._raw, self._payload, self._attached = raw, payload, True
        # streaming from here on (`_finish` ends it, if the early bytes hold the whole answer),
        # so a `direct` asked for while they are delivered holds for the pieces after them
        self._streaming = self._framing == CHUNKED and not self.done.done()
        early, self._early = self._early, []
        for data in early:
            self._body(data)
        if self._lost is not None and not self.done.done():
            self._end_of_stream(None if isinstance(self._lost, EOFError) else self._lost)  # type: ignore[arg-type]

    def pause(self) -> None:
        if self.transport is not None and not self.closed and self._pumped is None:
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.transport is not None and not self.closed and self._pumped is None:  # a pump reads it
            self.transport.resume_reading()

    def close(self) -> None:
        self.halt()
        if self.transport is not None and not self.closed:
            self.transport.close()
        self.closed = True

    @property
    def reusable(self) -> bool:
        done = self.done
        return (self._reusable and not self.closed and done.done() and not done.cancelled()
                and done.exception() is None)

    # ------------------------------------------------------------------ parsing

    def _read_head(self, data: bytes) -> bytes:
        buf = self._head_buf + data if self._head_buf else data
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD:
                    self._fail(UpstreamError("answer headers larger than 64 KiB"))
                self._head_buf = buf
                return b""
            try:
                head = parse_head(buf[:end], self.method)
            except UpstreamError as e:
                self._fail(e)
                return b""
            buf = buf[end + 4:]
            if 100 <= head.status < 200:  # an interim answer (100 Continue): the real one follows
                continue
            break
        self._head_buf = b""
        self._in_head = False
        self._framing, self._left = head.framing, head.length
        self._reusable = self._keep and not head.close
        if not self.head.done():  # not when the request was cancelled while it waited
            self.head.set_result(head)
        if head.framing == LENGTH and head.length == 0:
            self._finish()
        return buf

    def _body(self, data: bytes) -> None:
        if self.done.done():  # bytes after a complete answer: this connection cannot be trusted again
            self._reusable = False
            self.close()
            return
        framing = self._framing
        if framing == LENGTH:
            if len(data) >= self._left:
                if len(data) > self._left:
                    self._reusable = False
                    data = data[: self._left]
                self._left = 0
                self._deliver(data, data)
                self._finish()
            else:
                self._left -= len(data)
                self._deliver(data, data)
        elif framing == CHUNKED:
            if self._raw is not None:
                self._raw(data)
            self._chunks(data)
        else:
            self._deliver(data, data)

    def _deliver(self, raw: bytes, payload: bytes) -> None:
        if self._raw is not None:
            self._raw(raw)
        if self._payload is not None and payload:
            self._payload(payload)

    def _chunks(self, data: bytes) -> None:
        """Follow the chunk framing to find the body's end (and its payload, if wanted)."""
        pos, n = 0, len(data)
        payload = self._payload
        # the usual case first: whole chunks (llama-server sends a streamed event as one)
        while self._chunk_state == _SIZE and not self._line:
            eol = data.find(b"\r\n", pos)
            if eol < 0:
                break
            try:
                size = int(data[pos:eol], 16)
            except ValueError:  # extensions, or garbage: the general path decides
                break
            end = eol + 2 + size
            if size == 0 or end + 2 > n or not data.startswith(b"\r\n", end):
                break
            if payload is not None:
                payload(data[eol + 2:end])
            pos = end + 2
        while pos < n:
            state = self._chunk_state
            if state == _DATA:
                take = min(self._left, n - pos)
                if payload is not None:
                    payload(data[pos:pos + take])
                pos += take
                self._left -= take
                if self._left == 0:
                    self._chunk_state, self._left = _DATA_END, 2
            elif state == _DATA_END:
                take = min(self._left, n - pos)
                pos += take
                self._left -= take
                if self._left == 0:
                    self._chunk_state = _SIZE
            else:  # a size line or a trailer line
                eol = data.find(b"\n", pos)
                if eol < 0:
                    self._line += data[pos:]
                    if len(self._line) > 4096:
                        self._fail(BrokenAnswer("malformed chunk framing"))
                    return
                line = (self._line + data[pos:eol]).rstrip(b"\r") if self._line else data[pos:eol].rstrip(b"\r")
                self._line = b""
                pos = eol + 1
                if state == _SIZE:
                    try:
                        size = int(line.split(b";", 1)[0], 16)
                    except ValueError:
                        self._fail(BrokenAnswer(f"malformed chunk size {line[:20]!r}"))
                        return
                    if size:
                        self._chunk_state, self._left = _DATA, size
                    else:
                        self._chunk_state = _TRAILER
                elif not line:  # the blank line after the last chunk (and its trailers)
                    if pos < n:
                        self._reusable = False
                    self._chunk_state = _END
                    self._finish()
                    return

    def _end_of_stream(self, exc: BaseException | None) -> None:
        if self.done.done():
            return
        if self._framing == UNTIL_CLOSE and exc is None:
            self._finish()
        else:
            self._fail(BrokenAnswer(f"connection closed inside the answer ({exc or 'EOF'})"))

    def _finish(self) -> None:
        self._streaming = False
        self._direct = None
        self._pending = None
        self._stop_watch()
        if not self.done.done():
            self.done.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        self._streaming = False
        self._direct = None
        self._pending = None
        self._stop_watch()
        self._reusable = False
        for fut in (self.head, self.done):
            if not fut.done():
                fut.set_exception(exc)
                fut.exception()
        self.close()

    # ------------------------------------------------------------------ read timeout

    def _check_silence(self) -> None:
        """A watchdog that looks at the time of the last byte (or, for a stream's pieces, whether
        any came since it last looked), instead of a timer re-armed per chunk."""
        self._watch = None
        if self.done.done() or self.closed:
            return
        now = _monotonic()
        step = self._timeout
        if self._pending is not None:  # a stream's pieces are counted, not timed: look more often
            seen = self._settled + len(self._pending)
            if seen != self._seen:
                self._seen, self._last = seen, now
            step /= 4
        quiet = now - self._last
        if quiet >= self._timeout:
            self._fail(SilentUpstream(f"no answer for {self._timeout:g} s"))
        else:
            self._watch = self.loop.call_later(min(self._timeout - quiet, step), self._check_silence)

    def _stop_watch(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
