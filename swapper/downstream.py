"""Both ends of a relayed request as bytes: the request head for the child, the answer for the client.

The answer's head is written here rather than by aiohttp's `StreamResponse` so that a short
answer (head and body arrived together from the child) leaves in one `write`, and a streamed
token costs one `transport.write` (see relay.py for why the HTTP library is bypassed). The
client's connection belongs to front.py (or to aiohttp, for a connection front.py handed over):
the `Relayed` (or `RelayedResponse`) returned to it says whether the connection stays open.
"""

from __future__ import annotations

import asyncio
import collections
import json
import re
import time
from email.utils import formatdate
from typing import Any, Iterable

from aiohttp import web
from aiohttp.http import SERVER_SOFTWARE

from .framing import LENGTH, Head
from .relay import Exchange

try:
    import orjson
except ImportError:  # pragma: no cover - a platform without its wheel
    orjson = None  # type: ignore[assignment]

HOP_BY_HOP = {
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
    "transfer-encoding", "upgrade", "host", "content-length", "authorization", "x-api-key",
}
_REQUEST_SKIP = {h.encode() for h in HOP_BY_HOP} | {b"expect", b"proxy-connection"}
_ANSWER_SKIP = {h.encode() for h in HOP_BY_HOP} | {
    b"server", b"date", b"access-control-allow-origin", b"access-control-allow-credentials",
    b"access-control-allow-headers", b"access-control-allow-methods"}
_USAGE_RE = re.compile(rb'"usage"\s*:\s*(\{[^{}]*(?:\{[^{}]*\}[^{}]*)*\})')
_USAGE_KEY = b'"usage"'
_DONE_EVENT = b"data: [DONE]"
_LONG_DIGITS = re.compile(rb"\d{19}")  # an integer that may not fit in 64 bits (see parse_json)
_SERVER = SERVER_SOFTWARE.encode()


def request_head(request: web.Request, host: str, port: int, length: int, body: dict[str, Any] | None) -> bytes:
    """The request line and headers for the child: the client's own headers, less hop-by-hop
    ones and keys, with swapper's request ID; `Connection: close` for a stream, since
    llama-server drops the connection after a stream without saying so."""
    target = request.raw_path
    if not target.startswith("/"):
        target = request.rel_url.raw_path_qs
    rid = request.get("request_id")
    parts = [b"%s %s HTTP/1.1\r\nHost: %s:%d\r\n" % (request.method.encode(), target.encode(), host.encode(), port)]
    typed = False
    for name, value in request.raw_headers:
        low = name.lower()
        if low in _REQUEST_SKIP or (rid and low == b"x-request-id"):
            continue
        typed = typed or low == b"content-type"
        parts.append(name + b": " + value + b"\r\n")
    if rid:
        parts.append(b"X-Request-ID: " + rid.encode() + b"\r\n")
    if body is not None and not typed:
        parts.append(b"Content-Type: application/json\r\n")
    if length or request.method not in ("GET", "HEAD", "DELETE", "OPTIONS"):
        parts.append(b"Content-Length: %d\r\n" % length)
    if body is not None and body.get("stream") is True:
        parts.append(b"Connection: close\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


class _Date:
    """The Date and Server header lines, formatted once a second."""

    second = -1
    value = b""

    @classmethod
    def now(cls) -> bytes:
        t = int(time.time())
        if t != cls.second:
            cls.second = t
            cls.value = b"Date: " + formatdate(t, usegmt=True).encode() + b"\r\nServer: " + _SERVER + b"\r\n"
        return cls.value


def answer_head(request: web.Request, head: Head, extra: Iterable[tuple[str, str]], keep_alive: bool,
                chunked: bool) -> bytes:
    """The status line and headers the client gets: the child's, less hop-by-hop ones, plus
    swapper's (request ID, CORS), with the framing this hop uses."""
    v = request.version
    is_head = request.method == "HEAD"
    lines = [b"HTTP/%d.%d %d %s\r\n" % (v.major, v.minor, head.status, head.reason.encode("latin-1"))]
    for low, name, value in head.headers:
        if low not in _ANSWER_SKIP or (is_head and low == b"content-length"):
            lines.append(name + b": " + value + b"\r\n")
    for k, val in extra:
        lines.append(b"%s: %s\r\n" % (k.encode("latin-1"), val.encode("latin-1")))
    if head.status in (204, 304) or is_head:
        pass
    elif head.framing == LENGTH:
        lines.append(b"Content-Length: %d\r\n" % head.length)
    elif chunked:
        lines.append(b"Transfer-Encoding: chunked\r\n")
    lines.append(_Date.now())
    if v >= (1, 1) and not keep_alive:
        lines.append(b"Connection: close\r\n")
    elif v < (1, 1) and keep_alive:
        lines.append(b"Connection: keep-alive\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)


def keeps_alive(request: web.Request, head: Head) -> bool:
    """Whether the client's connection can carry another request after this answer: an
    HTTP/1.0 client learns where a body ends without a length only from the close."""
    return request.keep_alive and (head.framing == LENGTH or request.version >= (1, 1))


def parse_json(raw: bytes) -> Any:
    """`json.loads`, done by orjson when it can.

    orjson parses a request body in a fifth of the time, in one C call. Where it fails (NaN,
    a lone surrogate, a byte order mark, bad UTF-8: what the standard parser takes or words
    differently), the standard parser decides. orjson reads an integer beyond 64 bits as a
    float: harmless where the body is forwarded as sent, so a body that is re-serialised is
    read again when `may_round` says so (proxy.py).
    """
    if orjson is not None:
        try:
            return orjson.loads(raw)
        except ValueError:
            pass
    return json.loads(raw)


def may_round(raw: bytes) -> bool:
    """Whether `parse_json` may have read an integer of `raw` as a float (a run of 19 digits or
    more). A scan of the body, so asked only of bodies that are re-serialised."""
    return orjson is not None and _LONG_DIGITS.search(raw) is not None


class Relayed:
    """What the handler returns to front.py once the relay has written the whole answer: its
    status, and whether the connection stays open (`RelayedResponse` is the same for aiohttp)."""

    __slots__ = ("status", "keep_alive")
    relayed = True

    def __init__(self, status: int, keep_alive: bool):
        self.status = status
        self.keep_alive = keep_alive

    def force_close(self) -> None:
        self.keep_alive = False


class RelayedResponse(web.StreamResponse):
    """What the handler returns once the relay has written the whole answer to the transport:
    aiohttp must neither write a head nor an end of its own, only learn about keep-alive."""

    relayed = True  # its bytes are on the client's transport already

    def __init__(self, status: int, reason: str | None, keep_alive: bool):
        super().__init__(status=status, reason=reason)
        self._relayed_keep_alive = keep_alive

    @property
    def keep_alive(self) -> bool:
        return self._relayed_keep_alive

    def force_close(self) -> None:
        self._relayed_keep_alive = False

    async def prepare(self, request: web.BaseRequest) -> None:  # type: ignore[override]
        return None

    async def write_eof(self, data: bytes = b"") -> None:
        return None


class UsageSniffer:
    """Finds the `usage` object at the end of an answer (JSON body or last SSE events).

    It keeps the last pieces of the body as they were delivered (`feed` is a deque's append,
    so a streamed token costs one C call) and searches them once, when the answer is complete.
    """

    def __init__(self, pieces: int = 32):
        self.pieces: collections.deque[bytes] = collections.deque(maxlen=pieces)
        self.feed = self.pieces.append

    def ended(self) -> bool:
        """Whether the answer's last event so far is an OpenAI stream's end (`data: [DONE]`)."""
        tail = b"".join(list(self.pieces)[-2:]).rstrip()
        return tail.endswith(_DONE_EVENT)

    def usage(self) -> dict[str, Any] | None:
        """The last `usage` object: searched backwards from the end, where engines put it."""
        buf = b"".join(self.pieces)
        at = buf.rfind(_USAGE_KEY)
        while at >= 0:
            m = _USAGE_RE.match(buf, at)
            if m:
                try:
                    u = parse_json(m.group(1))
                except ValueError:
                    return None
                return u if isinstance(u, dict) else None
            at = buf.rfind(_USAGE_KEY, 0, at)
        return None


class Downstream:
    """The client's side of one relayed answer: the head (sent with the first body bytes when
    they came together), each piece as it arrives, the first byte's time, and back-pressure (a
    slow client pauses the child's connection instead of growing a buffer)."""

    HIGH_WATER = 1 << 20

    def __init__(self, request: web.Request, ex: Exchange, head: bytes, on_first: Any):
        self.ex = ex
        self.transport = request.transport
        self.writer = request.writer
        self.head: bytes | None = head
        self.on_first = on_first
        self.paused = False
        self.gone = False
        # front.py's connection, which tells this relay when its client pauses or leaves: then
        # a stream's pieces can go from the child's connection to the client's transport
        # without this object in between (Exchange.direct)
        self.conn: Any = getattr(request, "conn", None)
        self.direct = False

    def write(self, data: bytes) -> None:
        t = self.transport
        if t is None or t.is_closing():  # the client left: the handler is being cancelled
            self.gone = True
            self.ex.close()
            return
        if self.on_first is not None:
            self.on_first()
            self.on_first = None
            if self.head is not None:
                data, self.head = self.head + data, None
            if self.direct and self.conn is not None:
                self.conn.relay = self
                self.ex.direct(t.write, t)
        t.write(data)
        if t.get_write_buffer_size() > self.HIGH_WATER and not self.paused:
            self.paused = True
            self.ex.pause()
            asyncio.get_running_loop().create_task(self._resume())

    def flush_head(self) -> None:
        """The head alone, when no body byte came with it (a stream's first token is to come)."""
        if self.head is not None:
            head, self.head = self.head, None
            if self.transport is not None and not self.transport.is_closing():
                self.transport.write(head)

    def client_paused(self) -> None:
        """The client's transport holds more than its high-water mark (front.py's connection)."""
        if not self.paused:
            self.paused = True
            self.ex.pause()

    def client_resumed(self) -> None:
        if self.paused:
            self.paused = False
            self.ex.resume()

    def client_lost(self) -> None:
        """The client left: stop reading the child at once (its task is being cancelled)."""
        self.gone = True
        self.ex.close()

    def chunk(self, data: bytes) -> None:
        """A piece of a body that ends with the child's connection, chunk-framed for the client."""
        self.write(b"%x\r\n%s\r\n" % (len(data), data))

    async def _resume(self) -> None:
        try:
            await self.writer.drain()
        except (ConnectionError, RuntimeError):
            self.ex.close()
            return
        self.paused = False
        self.ex.resume()
