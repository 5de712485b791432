"""The client side of a proxied request below aiohttp: swapper's own connections on its port.

Why: aiohttp's server costs a proxied request more CPU than the relay itself (a `Request`, a
task per connection, a handler chain, a `StreamResponse`, a write per piece), and a streamed
answer is mostly per-connection and per-request cost. Here a connection is an
`asyncio.Protocol` that reads a plain `POST` to a model route (`/v1/chat/completions`, ...)
with a `Content-Length` body, runs it through the same steps as the aiohttp app (request ID,
keys, CORS, errors, access log: `middleware.serve`; the proxy: `Proxy.handle`) and lets the
relay write the answer to the transport.

Anything else — another method or route, `Transfer-Encoding`, `Expect`, `Upgrade`, a body over
the limit, a header this reader does not take as plain ASCII, HTTP/1.0 — is handed, with every
byte of the connection not yet consumed, to aiohttp's own protocol, which owns the connection
from then on. So the strict parser, its errors and every other route stay aiohttp's; this
module only takes the requests it fully understands.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Callable
from urllib.parse import parse_qsl

from aiohttp import web
from aiohttp.http import HttpVersion11
from multidict import CIMultiDict, CIMultiDictProxy, MultiDict, MultiDictProxy

from .downstream import _Date
from .middleware import answer_headers, serve
from .proxy import MODEL_ROUTES

if TYPE_CHECKING:
    from .app import Runtime

log = logging.getLogger("swapper.front")

MAX_HEAD = 8190  # aiohttp's own line limit: a longer head goes to aiohttp, which answers 431
KEEPALIVE = 75.0  # seconds an idle client connection is kept (aiohttp's default)
_ROUTES = frozenset(MODEL_ROUTES)
# the request line and header lines as this reader takes them: visible ASCII, tokens for names;
# one unambiguous pattern per line, so a bad head costs a linear scan and goes to aiohttp
_HEAD = re.compile(rb"POST (/[!-~]*) HTTP/1\.1\r\n((?:[!#$%&'*+.^_`|~0-9A-Za-z-]+:[\t -~]*\r\n)*)")
_FIELD = re.compile(rb"([^:\r\n]+):([^\r\n]*)\r\n")
_HANDOFF_FIELDS = frozenset({b"transfer-encoding", b"expect", b"upgrade"})
_EMPTY_QUERY: MultiDictProxy[str] = MultiDictProxy(MultiDict())
_PHRASES = {s.value: s.phrase for s in HTTPStatus}


class FastRequest(dict):  # type: ignore[type-arg]
    """What the proxy and the middleware read of a request, for one this module parsed.

    A dict for the per-request values the handlers keep (`request["usage"]`), as aiohttp's
    `Request` is a mapping for them."""

    version = HttpVersion11
    method = "POST"

    def __init__(self, conn: FrontConnection, raw_path: str, raw_headers: list[tuple[bytes, bytes]],
                 body: bytes, keep_alive: bool):
        super().__init__()
        self.conn = conn
        self.transport = conn.transport
        self.writer = conn
        self.raw_path = raw_path
        path, _, qs = raw_path.partition("?")
        self.path = path
        self.path_qs = raw_path
        self.query_string = qs
        self.query = _EMPTY_QUERY if not qs else MultiDictProxy(MultiDict(parse_qsl(qs, keep_blank_values=True)))
        self.raw_headers = raw_headers
        self.headers = CIMultiDictProxy(CIMultiDict(
            [(n.decode("latin-1"), v.decode("latin-1")) for n, v in raw_headers]))
        self.body = body  # read whole, within the limit: the proxy takes it as it is
        self.content_length = len(body)
        self.keep_alive = keep_alive


class FrontConnection(asyncio.Protocol):
    """One client connection: requests read in turn, each served in a task of its own."""

    def __init__(self, front: Front):
        self.front = front
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.task: asyncio.Task[None] | None = None
        self.relay: Any = None  # the Downstream of a stream handed on directly (downstream.py)
        self.idle_since = time.monotonic()
        self._paused: asyncio.Future[None] | None = None
        self._lost = False
        # a request whose head is read and whose body is still arriving: its parts, in a list
        # (a large body in many pieces is joined once, not copied on every piece)
        self._head: tuple[str, list[tuple[bytes, bytes]], bool, int] | None = None
        self._parts: list[bytes] = []
        self._have = 0

    # ------------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.front.conns.add(self)

    def data_received(self, data: bytes) -> None:
        if self._head is not None:  # the body of the request under way
            self._parts.append(data)
            self._have += len(data)
            if self._have >= self._head[3]:
                self._body_complete()
            return
        self.buf = self.buf + data if self.buf else data
        if self.task is None:
            self._next()
        elif len(self.buf) > 1 << 16:  # a client sending ahead of its answer: wait for it
            self.transport.pause_reading()  # type: ignore[union-attr]

    def eof_received(self) -> bool | None:
        """The client closed its end: as with aiohttp, that is a client that left (the request
        under way is cancelled, and its child stops generating)."""
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self.front.conns.discard(self)
        if self.relay is not None:
            self.relay.client_lost()
        if self.task is not None:
            self.task.cancel()  # the client left: the relay closes the child's connection
        if self._paused is not None and not self._paused.done():
            self._paused.set_exception(ConnectionResetError("client connection lost"))
            self._paused.exception()

    def pause_writing(self) -> None:
        if self._paused is None or self._paused.done():
            self._paused = asyncio.get_running_loop().create_future()
        if self.relay is not None:
            self.relay.client_paused()

    def resume_writing(self) -> None:
        if self._paused is not None and not self._paused.done():
            self._paused.set_result(None)
        if self.relay is not None:
            self.relay.client_resumed()

    async def drain(self) -> None:
        """Until the client has taken the bytes written to it (the relay's back-pressure)."""
        if self._lost:
            raise ConnectionResetError("client connection lost")
        if self._paused is not None and not self._paused.done():
            await self._paused

    # ------------------------------------------------------------------ requests

    def _next(self) -> None:
        buf = self.buf
        if not buf:
            return
        end = buf.find(b"\r\n\r\n", 0, MAX_HEAD + 4)
        if end < 0:
            if len(buf) > MAX_HEAD or not buf.startswith(b"POST /"[:len(buf)]):
                self._handoff()
            return
        m = _HEAD.fullmatch(buf, 0, end + 2)
        if m is None:
            self._handoff()
            return
        raw_path = m.group(1)
        path = raw_path.split(b"?", 1)[0]
        if b"%" in path or path.decode() not in _ROUTES:
            self._handoff()
            return
        length = -1
        keep_alive = True
        fields = []
        for name, value in _FIELD.findall(m.group(2)):
            low = name.lower()
            value = value.strip(b" \t")
            if low == b"content-length":
                if length >= 0 or not value.isdigit():
                    self._handoff()
                    return
                length = int(value)
            elif low in _HANDOFF_FIELDS:
                self._handoff()
                return
            elif low == b"connection":
                tokens = {t.strip().lower() for t in value.split(b",")}
                if tokens - {b"close", b"keep-alive"}:
                    self._handoff()
                    return
                keep_alive = b"close" not in tokens
            fields.append((name, value))
        if length < 0 or length > self.front.rt.settings.max_body:
            self._handoff()
            return
        start = end + 4
        self._head = (raw_path.decode(), fields, keep_alive, length)
        self._parts = [buf[start:]]
        self._have = len(buf) - start
        self.buf = b""
        if self._have >= length:
            self._body_complete()

    def _body_complete(self) -> None:
        assert self._head is not None
        raw_path, fields, keep_alive, length = self._head
        data = self._parts[0] if len(self._parts) == 1 else b"".join(self._parts)
        self._head, self._parts, self._have = None, [], 0
        self.buf = data[length:]  # what the client sent after this request (pipelined)
        req = FastRequest(self, raw_path, fields, data[:length], keep_alive)
        self.task = asyncio.get_running_loop().create_task(self._serve(req))

    async def _serve(self, req: FastRequest) -> None:
        t = self.transport
        keep = False
        try:
            resp = await serve(self.front.rt, req, self.front.handler)
            keep = req.keep_alive and resp.keep_alive is not False
            if not getattr(resp, "relayed", False):
                keep = self._write_answer(req, resp, keep)
        except asyncio.CancelledError:
            pass
        except Exception:  # nothing a request does may take the server down
            log.exception("serving %s failed", req.path)
        finally:
            self.task = None
            self.relay = None
            self.idle_since = time.monotonic()
            if t is None or t.is_closing():
                return
            if not keep:
                self._close()
                return
            t.resume_reading()
            if self.buf:
                self._next()

    def _write_answer(self, req: FastRequest, resp: web.StreamResponse, keep: bool) -> bool:
        """An answer swapper made itself (an error, mostly), as aiohttp would have sent it;
        whether the connection stays open after it."""
        if not isinstance(resp, web.Response) or not isinstance(resp.body, (bytes, bytearray, type(None))):
            log.error("cannot send a %s answer on %s", type(resp).__name__, req.path)
            return False
        body = bytes(resp.body or b"")
        reason = resp.reason or _PHRASES.get(resp.status, "Unknown")
        lines = [b"HTTP/1.1 %d %s\r\n" % (resp.status, reason.encode("latin-1"))]
        for k, v in resp.headers.items():
            if k.lower() not in ("content-length", "connection", "date", "server", "transfer-encoding"):
                lines.append(b"%s: %s\r\n" % (k.encode("latin-1"), v.encode("latin-1")))
        for k, v in answer_headers(self.front.rt, req):
            lines.append(b"%s: %s\r\n" % (k.encode("latin-1"), v.encode("latin-1")))
        lines.append(b"Content-Length: %d\r\n" % len(body))
        lines.append(_Date.now())
        if not keep:
            lines.append(b"Connection: close\r\n")
        lines.append(b"\r\n")
        self.transport.write(b"".join(lines) + body)  # type: ignore[union-attr]
        return keep

    def _handoff(self) -> None:
        """aiohttp's protocol takes the connection, with every byte not yet consumed."""
        t, data = self.transport, self.buf
        self.buf = b""
        self.front.conns.discard(self)
        if t is None or t.is_closing():
            return
        self.front.handoffs += 1
        handler = self.front.aio_server()
        t.set_protocol(handler)
        handler.connection_made(t)
        t.resume_reading()
        if data:
            handler.data_received(data)

    def _close(self) -> None:
        if self.relay is not None:  # a stream's pump writes to this socket: stop it first
            self.relay.ex.halt()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


class Front:
    """swapper's listening socket: its connections, the idle ones' expiry, and the drain at exit."""

    def __init__(self, rt: Runtime, aio_server: Callable[[], asyncio.Protocol],
                 handler: Callable[[Any], Any]):
        self.rt = rt
        self.aio_server = aio_server
        self.handler = handler
        self.conns: set[FrontConnection] = set()
        self.server: asyncio.AbstractServer | None = None
        self.keepalive = KEEPALIVE
        self.handoffs = 0  # connections handed to aiohttp
        self._sweeper: asyncio.TimerHandle | None = None

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: FrontConnection(self), host, port,
                                               backlog=1024, reuse_address=True)
        self._sweeper = loop.call_later(min(5.0, self.keepalive), self._sweep)

    def _sweep(self) -> None:
        """Idle connections past their keep-alive time closed (one timer for all of them)."""
        now = time.monotonic()
        for c in list(self.conns):
            if c.task is None and c._head is None and now - c.idle_since > self.keepalive:
                c._close()
        self._sweeper = asyncio.get_running_loop().call_later(min(5.0, self.keepalive), self._sweep)

    async def close(self, timeout: float) -> None:
        """Stop listening, let requests under way finish (up to `timeout`), close the rest."""
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self.server is not None:
            self.server.close()
        for c in list(self.conns):
            if c.task is None:
                c._close()
        tasks = [c.task for c in self.conns if c.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
        for c in list(self.conns):
            if c.task is not None:
                c.task.cancel()
            c._close()
