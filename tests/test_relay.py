"""The hop to a child below the HTTP library: framing, pooling, timeouts and breaks, byte for byte.

A scripted loopback server answers with exactly the bytes each test gives it, split as the test
says, so every way an answer can be framed (length, chunks split anywhere, until close) and cut
is covered without an engine.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import socket
import time
from typing import AsyncIterator, Callable

import pytest

from schedfakes import entry as entry_of
from polls import eventually
from swapper.framing import CHUNKED, BrokenAnswer, NoAnswer, SilentUpstream, UpstreamError, parse_head, whole_chunks
from swapper.relay import Exchange
from swapper.upstreams import Upstreams

REQUEST = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"


class Scripted:
    """A loopback server whose handler for each connection is set by the test."""

    def __init__(self) -> None:
        self.handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], object] | None = None
        self.connections = 0
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        assert self.handler is not None
        try:
            await self.handler(reader, writer)  # type: ignore[misc]
        except (ConnectionError, asyncio.IncompleteReadError):
            pass

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]


@pytest.fixture
async def upstream() -> AsyncIterator[Scripted]:
    s = Scripted()
    await s.start()
    yield s
    assert s.server is not None
    s.server.close()


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head + await reader.readexactly(length)


def answering(*pieces: bytes, close: bool = False, requests: int = 1, pause: float = 0.0) -> Callable:
    """A handler that answers each request with `pieces`, written one at a time."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(requests):
            await read_request(reader)
            for p in pieces:
                writer.write(p)
                await writer.drain()
                if pause:
                    await asyncio.sleep(pause)
        if close:
            writer.close()
        else:
            await reader.read()  # hold the connection until the client drops it

    return handler


def held_until(release: asyncio.Event) -> Callable:
    """A handler that answers `ok` to every request on its connection once `release` is set."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            await release.wait()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    return handler


async def exchange(pool: Upstreams, port: int, method: str = "POST", timeout: float = 5.0,
                   keep_alive: bool = True) -> tuple[int, bytes, bytes, object]:
    """One request through the pool: (status, raw bytes relayed, payload, exchange)."""
    ex = await pool.open("127.0.0.1", port, 5.0)
    raw: list[bytes] = []
    payload: list[bytes] = []
    try:
        ex.send(method, REQUEST.replace(b"POST", method.encode(), 1), timeout, keep_alive=keep_alive)
        head = await ex.head
        ex.attach(raw.append, payload.append)
        await ex.done
        return head.status, b"".join(raw), b"".join(payload), ex
    finally:
        pool.release("127.0.0.1", port, ex)


CHUNKED = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"9\r\ndata: one\r\n"
           b"9;ext=1\r\ndata: two\r\n"
           b"0\r\nX-Trailer: t\r\n\r\n")


async def test_a_chunked_answer_is_relayed_as_framed_and_its_payload_is_found_wherever_it_is_split(upstream):
    head_end = CHUNKED.index(b"\r\n\r\n") + 4
    body = CHUNKED[head_end:]
    for cut in range(1, len(body)):
        upstream.handler = answering(CHUNKED[:head_end + cut], CHUNKED[head_end + cut:], pause=0.001)
        pool = Upstreams(4)
        status, raw, payload, _ = await exchange(pool, upstream.port)
        assert status == 200
        assert raw == body, f"split at {cut}"
        assert payload == b"data: onedata: two", f"split at {cut}"
        pool.close()


async def test_a_length_framed_answer_ends_at_its_length_and_its_connection_is_reused(upstream):
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
    upstream.handler = answering(answer[:20], answer[20:], requests=3)
    pool = Upstreams(4)
    for i in range(3):
        status, raw, payload, ex = await exchange(pool, upstream.port)
        assert (status, raw, payload) == (200, b"hello", b"hello")
        assert ex.reused == (i > 0)
    assert upstream.connections == 1
    pool.close()


async def test_an_answer_without_length_or_chunks_ends_with_the_connection(upstream):
    upstream.handler = answering(b"HTTP/1.1 200 OK\r\n\r\nall ", b"of it", close=True)
    pool = Upstreams(4)
    status, raw, _, ex = await exchange(pool, upstream.port)
    assert (status, raw) == (200, b"all of it")
    assert not ex.reusable
    pool.close()


async def test_interim_answers_are_skipped_and_bodiless_ones_end_at_their_head(upstream):
    upstream.handler = answering(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n")
    pool = Upstreams(4)
    status, raw, _, _ = await exchange(pool, upstream.port)
    assert (status, raw) == (204, b"")
    pool.close()
    upstream.handler = answering(b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n")
    status, raw, _, _ = await exchange(pool, upstream.port, method="HEAD")
    assert (status, raw) == (200, b""), "a HEAD answer has no body whatever its length says"
    pool.close()


async def test_a_connection_closed_before_the_status_line_is_no_answer(upstream):
    upstream.handler = answering(close=True)
    pool = Upstreams(4)
    with pytest.raises(NoAnswer):
        await exchange(pool, upstream.port)
    pool.close()


async def test_a_connection_closed_inside_the_body_is_a_broken_answer(upstream):
    upstream.handler = answering(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf", close=True)
    pool = Upstreams(4)
    with pytest.raises(BrokenAnswer):
        await exchange(pool, upstream.port)
    upstream.handler = answering(CHUNKED[:-12], close=True)
    with pytest.raises(BrokenAnswer):
        await exchange(pool, upstream.port)
    pool.close()


async def test_a_child_silent_longer_than_the_read_timeout_fails_the_answer(upstream):
    upstream.handler = answering(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n", pause=5.0)
    pool = Upstreams(4)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(SilentUpstream):
        await exchange(pool, upstream.port, timeout=0.3)
    assert loop.time() - t0 < 3.0
    pool.close()


async def test_a_garbled_answer_is_an_upstream_error(upstream):
    upstream.handler = answering(b"SPDY/9 what\r\n\r\n")
    pool = Upstreams(4)
    with pytest.raises(UpstreamError):
        await exchange(pool, upstream.port)
    upstream.handler = answering(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
    with pytest.raises(BrokenAnswer):
        await exchange(pool, upstream.port)
    pool.close()


async def test_a_request_that_asked_for_close_never_returns_its_connection_to_the_pool(upstream):
    upstream.handler = answering(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", requests=2)
    pool = Upstreams(4)
    await exchange(pool, upstream.port, keep_alive=False)
    await exchange(pool, upstream.port)
    assert upstream.connections == 2
    pool.close()


async def test_the_child_saying_close_keeps_the_connection_out_of_the_pool(upstream):
    upstream.handler = answering(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")
    pool = Upstreams(4)
    await exchange(pool, upstream.port)
    await exchange(pool, upstream.port)
    assert upstream.connections == 2
    pool.close()


async def test_no_more_connections_than_the_limit_and_waiters_are_served_in_turn(upstream):
    release = asyncio.Event()
    upstream.handler = held_until(release)
    pool = Upstreams(2)
    tasks = [asyncio.create_task(exchange(pool, upstream.port)) for _ in range(5)]
    await eventually(lambda: upstream.connections == 2, timeout=2.0)
    assert upstream.connections == 2
    release.set()
    results = await asyncio.gather(*tasks)
    assert [r[1] for r in results] == [b"ok"] * 5
    assert upstream.connections == 2, "the waiters reused the two connections"
    pool.close()


async def test_an_idle_connection_past_its_time_is_not_reused(upstream):
    upstream.handler = answering(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", requests=2)
    pool = Upstreams(4, idle_timeout=0.0)
    await exchange(pool, upstream.port)
    await exchange(pool, upstream.port)
    assert upstream.connections == 2
    pool.close()


def test_heads_are_read_as_the_child_wrote_them():
    h = parse_head(b"HTTP/1.1 404 Not Found\r\nContent-Length: 3\r\nX-A: b: c", "POST")
    assert (h.status, h.reason, h.length, h.close) == (404, "Not Found", 3, False)
    assert (b"x-a", b"X-A", b"b: c") in h.headers
    assert parse_head(b"HTTP/1.0 200 OK\r\nContent-Length: 0", "GET").close
    assert not parse_head(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0", "GET").close
    for bad in (b"HTTP/1.1 abc", b"HTTP/1.1 200 OK\r\nno colon", b"HTTP/1.1 200 OK\r\nContent-Length: -1"):
        with pytest.raises(UpstreamError):
            parse_head(bad, "GET")


async def test_an_answer_arriving_after_its_request_gave_up_is_dropped_with_the_connection(upstream):
    gate = asyncio.Event()

    async def late(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await gate.wait()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await reader.read()

    upstream.handler = late
    errors: list[dict] = []
    asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: errors.append(ctx))
    pool = Upstreams(4)
    ex = await pool.open("127.0.0.1", upstream.port, 5.0)
    ex.send("POST", REQUEST, 5.0)
    waiting = asyncio.create_task(asyncio.wait_for(asyncio.shield(ex.head), 5.0))
    ex.head.cancel()  # the client left while the child had not answered yet
    with pytest.raises(asyncio.CancelledError):
        await waiting
    gate.set()
    await eventually(lambda: ex._head_buf or not ex._in_head, timeout=2.0)  # the late answer arrives
    assert not ex._in_head and not errors, errors
    pool.release("127.0.0.1", upstream.port, ex)
    assert ex.closed and not ex.reusable
    pool.close()


async def test_each_child_has_its_own_connection_limit(upstream):
    release = asyncio.Event()
    upstream.handler = held_until(release)
    pool = Upstreams(2)  # the default, for children that say nothing

    async def one() -> bytes:
        ex = await pool.open("127.0.0.1", upstream.port, 5.0, limit=6)
        try:
            ex.send("POST", REQUEST, 5.0)
            await ex.head
            got: list[bytes] = []
            ex.attach(got.append, None)
            await ex.done
            return b"".join(got)
        finally:
            pool.release("127.0.0.1", upstream.port, ex)

    tasks = [asyncio.create_task(one()) for _ in range(8)]
    await eventually(lambda: upstream.connections == 6, timeout=2.0)
    assert upstream.connections == 6, "this child's own limit, not the pool's default"
    release.set()
    assert await asyncio.gather(*tasks) == [b"ok"] * 8
    pool.close()


def test_a_llama_server_child_takes_as_many_connections_as_its_slots_need():
    from swapper.backends.llamacpp import LlamaCppBackend
    from swapper.config import Settings

    backend = LlamaCppBackend(Settings())
    small = dataclasses.replace(entry_of("a"), parallel=1)
    big = dataclasses.replace(entry_of("b"), parallel=32)
    assert backend.connections(small) == 14  # 16 HTTP threads, two kept for probes and scrapes
    assert backend.connections(big) == 34  # 36 threads for 32 slots
    told = dataclasses.replace(entry_of("c"), args=("--threads-http", "8"))
    assert backend.connections(told) == 6


async def test_a_connect_that_hangs_fails_at_the_connect_timeout_and_leaves_the_task_usable():
    """A child whose accept queue is full drops new connections' SYNs: the connect waits."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    held: list[socket.socket] = []
    pool = Upstreams(limit=64)
    try:
        for _ in range(16):  # fill the accept queue (nobody accepts) until a connect waits
            s = socket.socket()
            held.append(s)
            s.settimeout(0.2)
            try:
                s.connect(("127.0.0.1", port))
            except TimeoutError:
                break
        else:
            pytest.fail("the accept queue never filled")
        t0 = time.monotonic()
        with pytest.raises(asyncio.TimeoutError):
            await pool.open("127.0.0.1", port, connect_timeout=0.3)
        assert 0.25 <= time.monotonic() - t0 < 2.0
        task = asyncio.current_task()
        assert task is not None and not task.cancelling(), "the timer's cancellation is taken back"
        await asyncio.sleep(0)  # raises CancelledError if a cancellation were still pending
    finally:
        for s in held:
            s.close()
        server.close()
        pool.close()


async def streamed(pool: Upstreams, port: int, timeout: float = 5.0) -> tuple[bytes, bytes]:
    """A stream as the proxy relays one: the request asks the child to close after it, and from
    the first piece on the pieces go straight to the client's write. (raw bytes, payload)"""
    ex = await pool.open("127.0.0.1", port, 5.0)
    raw: list[bytes] = []
    payload: list[bytes] = []

    def first(data: bytes) -> None:
        raw.append(data)
        if len(raw) == 1:
            ex.direct(raw.append)

    try:
        ex.send("POST", REQUEST, timeout, keep_alive=False)
        await ex.head
        ex.attach(first, payload.append)
        await ex.done
        return b"".join(raw), b"".join(payload)
    finally:
        pool.release("127.0.0.1", port, ex)


STREAM_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


def _events(n: int) -> list[bytes]:
    return [b"%x\r\n%s\r\n" % (len(e), e) for e in (b"data: %d\n\n" % i for i in range(n))]


async def test_a_long_stream_ends_at_its_last_chunk_even_if_the_child_keeps_the_connection(upstream):
    """The framing of a stream's pieces is read in batches; the last chunk still ends it at once."""
    events = _events(150)  # more than two batches
    upstream.handler = answering(STREAM_HEAD, *events, b"0\r\n\r\n", pause=0.0005)  # and holds on
    pool = Upstreams(4)
    raw, payload = await asyncio.wait_for(streamed(pool, upstream.port), 10)
    assert raw == b"".join(events) + b"0\r\n\r\n"
    assert payload == b"".join(b"data: %d\n\n" % i for i in range(150)), "every event's payload, in order"
    pool.close()


async def test_a_long_stream_cut_off_by_the_child_is_a_broken_answer(upstream):
    events = _events(100)
    upstream.handler = answering(STREAM_HEAD, *events, close=True, pause=0.0005)
    pool = Upstreams(4)
    with pytest.raises(BrokenAnswer):
        await asyncio.wait_for(streamed(pool, upstream.port), 10)
    pool.close()


async def test_a_stream_with_bad_framing_past_its_first_piece_fails_by_the_time_the_child_closes(upstream):
    upstream.handler = answering(STREAM_HEAD, *_events(3), b"zz\r\nnot a chunk\r\n", *_events(2), close=True,
                                 pause=0.0005)
    pool = Upstreams(4)
    with pytest.raises(BrokenAnswer, match="malformed chunk size"):
        await asyncio.wait_for(streamed(pool, upstream.port), 10)
    pool.close()


async def test_a_stream_whose_last_chunk_is_split_ends_with_the_piece_that_completes_it(upstream):
    """The client has the whole answer once the last bytes are relayed: so must the relay,
    whatever the split, even while the child keeps the connection open."""
    events = b"".join(_events(3))
    for tail in (b"0\r\n\r\n", b"X-Trailer: t\r\n\r\n"):
        body = events + (b"0\r\n" + tail if tail.startswith(b"X") else tail)
        for cut in range(1, 8):
            upstream.handler = answering(STREAM_HEAD, body[:-cut], body[-cut:], pause=0.0005)
            pool = Upstreams(4)
            raw, payload = await asyncio.wait_for(streamed(pool, upstream.port, timeout=3.0), 2.0)
            assert raw == body, cut
            pool.close()


async def test_a_stream_that_keeps_talking_outlives_its_read_timeout(upstream):
    """The read timeout bounds a silence, not the answer: pieces every 0.1 s for 1.3 s."""
    events = _events(12)
    upstream.handler = answering(STREAM_HEAD, *events, b"0\r\n\r\n", pause=0.1)
    pool = Upstreams(4)
    raw, _ = await asyncio.wait_for(streamed(pool, upstream.port, timeout=0.4), 10)
    assert raw == b"".join(events) + b"0\r\n\r\n"
    pool.close()


async def test_a_stream_that_falls_silent_fails_within_a_quarter_past_its_read_timeout(upstream):
    upstream.handler = answering(STREAM_HEAD, *_events(3), pause=0.05)  # then holds the connection, silent
    pool = Upstreams(4)
    t0 = time.monotonic()
    with pytest.raises(SilentUpstream):
        await asyncio.wait_for(streamed(pool, upstream.port, timeout=1.0), 10)
    assert 1.0 <= time.monotonic() - t0 < 1.7, "found silent after 1 to 1.25 timeouts (and the loop's delay)"
    pool.close()


async def test_a_stream_whose_events_hold_crlf_is_read_chunk_by_chunk_and_whole(upstream):
    """SSE may end its lines with CR LF: the batch split cannot tell those from framing, so the
    walk reads them, and the payload and the end are the same."""
    events = [b"%x\r\n%s\r\n" % (len(e), e) for e in (b"data: %d\r\n\r\n" % i for i in range(100))]
    upstream.handler = answering(STREAM_HEAD, *events, b"0\r\n\r\n", pause=0.0005)
    pool = Upstreams(4)
    raw, payload = await asyncio.wait_for(streamed(pool, upstream.port), 10)
    assert raw == b"".join(events) + b"0\r\n\r\n"
    assert payload == b"".join(b"data: %d\r\n\r\n" % i for i in range(100))
    pool.close()


def _walked(data: bytes, loop: asyncio.AbstractEventLoop) -> tuple[bytes, bool, bool]:
    """What the chunk-by-chunk walk reads from `data`: (payload, ended, failed)."""
    ex = Exchange(loop)
    out: list[bytes] = []
    ex._payload, ex._framing = out.append, CHUNKED
    ex._chunks(data)
    failed = ex.done.done() and ex.done.exception() is not None
    return b"".join(out), ex.done.done() and not failed, failed


def _framings(rng: random.Random) -> list[bytes]:
    """Chunked bodies and parts of them, of the kinds engines send and of the kinds they may."""
    alphabet = [b"data: ", b"{}", b"0", b"\r\n", b"\n\n", b"x", b"\r", b"\n"]
    chunks = []
    for _ in range(rng.randint(0, 6)):
        payload = b"".join(rng.choice(alphabet) for _ in range(rng.randint(1, 8)))
        size = b"%x" % len(payload)
        if rng.random() < 0.2:
            size = size.upper() if rng.random() < 0.5 else size + b";ext"
        if rng.random() < 0.1:
            size = b"%x" % (len(payload) + rng.choice((-1, 1)))
        chunks.append(size + b"\r\n" + payload + b"\r\n")
    if rng.random() < 0.2:  # an end, then more: bytes after the body
        chunks.insert(rng.randint(0, len(chunks)), b"0\r\n\r\n")
    body = b"".join(chunks)
    ending = rng.choice([b"", b"0\r\n\r\n", b"0\r\nX-T: 1\r\n\r\n", b"0;e\r\n\r\n"])
    whole = body + ending
    return [whole, whole[: rng.randint(0, len(whole))]]


def test_the_batch_split_reads_exactly_what_the_walk_reads_whenever_it_answers():
    rng = random.Random(17)
    answered = 0
    loop = asyncio.new_event_loop()
    try:
        for _ in range(4000):
            for data in _framings(rng):
                split = whole_chunks(data)
                if split is None:
                    continue
                answered += 1
                payloads, last = split
                payload, ended, failed = _walked(data, loop)
                assert not failed and (b"".join(payloads), last) == (payload, ended), data
    finally:
        loop.close()
    assert answered > 500, "the comparison is not vacuous: the split answers for whole chunks"


def test_the_batch_split_answers_for_what_streaming_engines_send():
    events = [b"data: {\"i\": %d}\n\n" % i for i in range(64)]
    body = b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events)
    assert whole_chunks(body) == (events, False)
    assert whole_chunks(body + b"0\r\n\r\n") == (events, True)
    assert whole_chunks(b"0\r\n\r\n") == ([], True)
    assert whole_chunks(body[:-1]) is None, "a chunk cut off"
    assert whole_chunks(body + b"0\r\n\r\n" + body) is None, "bytes after the last chunk"
