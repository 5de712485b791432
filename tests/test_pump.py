"""A stream relayed by a pump thread (swapper/_pump.c, pumping.py) on swapper's own port.

Each test checks that the pump ran (and how it stopped) as well as what the client and the
metrics saw, so that a path the pump hands back to the event loop is known to have been taken:
the answer's end, a client that leaves, a client that cannot keep up, a child that goes silent
or closes, framing the pump does not read strictly, and a stop asked for.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import socket
import time
from typing import Any, AsyncIterator, Awaitable, Callable

import aiohttp
import pytest

from swapper import pumping
from swapper.framing import whole_chunks
from swapper.relay import Exchange

from polls import eventually
from test_front import BODY, front, gguf, on_one_connection, sample  # noqa: F401 - fixtures

# `make install` builds it (pip, with the C compiler `make build-deps` installs); CI must run these
pytestmark = pytest.mark.skipif(not pumping.AVAILABLE and not os.environ.get("CI"), reason="swapper._pump is not built")
own = pytest.mark.parametrize("front", ["own"], indirect=True)  # pumps serve swapper's own port only


@pytest.fixture
def pumps(monkeypatch: pytest.MonkeyPatch) -> list[pumping.Outcome]:
    """How each pump stopped, in order."""
    seen: list[pumping.Outcome] = []
    outcome = pumping.Pumped.outcome

    def recording(self: pumping.Pumped, stop: bool = False) -> pumping.Outcome:
        out = outcome(self, stop)
        seen.append(out)
        return out

    monkeypatch.setattr(pumping.Pumped, "outcome", recording)
    return seen


def events(body: bytes) -> list[Any]:
    return [json.loads(e) for e in body.decode().split("data: ")[1:-1]]


@own
async def test_a_stream_is_pumped_and_its_end_goes_back_to_the_event_loop(front, pumps):
    client, _, rt = await front()
    r = await client.post("/v1/completions", json={**BODY, "stream": True, "max_tokens": 40, "pace": 0.002})
    body = await r.read()
    assert r.status == 200 and len(events(body)) == 40 and body.endswith(b"data: [DONE]\n\n")
    [out] = pumps
    assert out.result == pumping.HANDBACK and out.pieces >= 30, "the tokens went through the pump"
    assert b"0\r\n\r\n" in out.rest, "the piece with the answer's end is the event loop's to pass on"
    assert sample(rt, "swapper_completion_tokens_total", model="tiny") == 40, "usage read from the pump's tail"
    assert sample(rt, "swapper_requests_total", model="tiny", code="200") == 1


@own
async def test_without_the_pump_the_event_loop_relays_the_same_stream(front, pumps, monkeypatch):
    monkeypatch.setattr(pumping, "AVAILABLE", False)
    client, _, rt = await front()
    r = await client.post("/v1/completions", json={**BODY, "stream": True, "max_tokens": 40, "pace": 0.002})
    assert len(events(await r.read())) == 40 and pumps == []
    assert sample(rt, "swapper_completion_tokens_total", model="tiny") == 40


@own
async def test_a_client_leaving_a_pumped_stream_is_a_499_and_the_engine_stops(front, pumps):
    client, engine, rt = await front()
    r = await client.post("/v1/completions", json={**BODY, "stream": True, "max_tokens": 2000, "pace": 0.005})
    assert r.status == 200 and (await r.content.readany()).startswith(b"data: ")
    assert await eventually(lambda: any(p is not None for p in _running(client))), "a pump took the stream"
    r.close()
    assert await eventually(lambda: engine.cut and sample(rt, "swapper_requests_total", model="tiny", code="499") == 1)
    assert engine.cut[0] < 1999, "the engine stopped long before its last token"
    assert [p.result for p in pumps] == [pumping.CLIENT]
    assert sample(rt, "swapper_requests_total", model="tiny", code="502") == 0


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def sse(i: int, usage: bool = False) -> bytes:
    event: dict[str, Any] = {"choices": [{"text": f" t{i}", "index": 0}]}
    if usage:
        event["usage"] = {"prompt_tokens": 1, "completion_tokens": i + 1, "total_tokens": i + 2}
    return b"data: " + json.dumps(event).encode() + b"\n\n"


HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"


class Client:
    """A stream asked on swapper's port by hand, its bytes kept as they come: swapper passes the
    engine's chunks on as they are, so the engine can wait until a piece has reached the client."""

    def __init__(self) -> None:
        self.data = b""

    def body(self) -> bytes:
        head, sep, body = self.data.partition(b"\r\n\r\n")
        return body if sep else b""

    async def stream(self, port: int) -> tuple[int, list[bytes], bool]:
        """The answer's status, its payloads as far as they came, and whether its body ended."""
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        body = json.dumps({**BODY, "stream": True}).encode()
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        try:
            while not self.body().endswith(b"0\r\n\r\n"):
                piece = await asyncio.wait_for(reader.read(1 << 16), 30)
                if not piece:
                    break  # swapper closed the connection: the body was cut
                self.data += piece
        finally:
            writer.close()
        split = whole_chunks(self.body())
        assert split is not None, self.body()[-200:]
        return int(self.data.split(b" ", 2)[1]), *split


class Engine:
    """A stand-in that writes a streamed answer's raw bytes (after the head it sends first), each
    piece once swapper has relayed it to `client`, so that every piece is a read of its own."""

    def __init__(self, client: Client | None = None):
        self.client = client  # None: no waiting between pieces
        self.writer: asyncio.StreamWriter | None = None
        self.sent = 0

    async def send(self, piece: bytes) -> None:
        assert self.writer is not None
        if not self.sent:
            piece = HEAD + piece
        self.writer.write(piece)
        self.sent += len(piece) - (len(HEAD) if not self.sent else 0)
        client = self.client
        if client is not None:
            assert await eventually(lambda: len(client.body()) >= self.sent, every=0.001), "relayed"

    async def tokens(self, n: int, usage_at: int = -1) -> None:
        for i in range(n):
            await self.send(chunk(sse(i, usage=usage_at == i)))

    async def serve(self, script: Callable[[Engine], Awaitable[None]]) -> tuple[asyncio.Server, str]:
        """Listens; reads a request, then runs `script`, then closes the connection."""
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            self.writer = writer
            try:
                await script(self)
            finally:
                writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


@contextlib.asynccontextmanager
async def scripted(front: Any, script: Callable[[Engine], Awaitable[None]],
                   **settings: Any) -> AsyncIterator[tuple[Client, Any, Any]]:
    """A front whose child is an `Engine` playing `script`, and a `Client` for swapper's port:
    (the client, the front's test client, its runtime). The engine stops listening after."""
    c = Client()
    server, url = await Engine(c).serve(script)
    try:
        client, _, rt = await front(engine_url=url, **settings)
        yield c, client, rt
    finally:
        server.close()


@own
@pytest.mark.parametrize("seed", range(6))
async def test_a_stream_in_pieces_cut_anywhere_arrives_whole(front, pumps, seed):
    """The engine's bytes cut at random places (inside size lines, payloads and line ends) and
    sent one by one: the pump reads the framing across the cuts."""
    body = b"".join(chunk(sse(i, usage=i == 29)) for i in range(30)) + chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"
    rng = random.Random(seed)
    first = len(chunk(sse(0)))  # the first chunk comes with the head
    cuts = sorted(rng.sample(range(first + 1, len(body)), 60))
    pieces = [body[:first]] + [body[a:b] for a, b in zip([first] + cuts, cuts + [len(body)])]

    async def script(e: Engine) -> None:
        for p in pieces:
            await e.send(p)

    async with scripted(front, script) as (c, client, rt):
        status, payloads, ended = await c.stream(client.port)
        assert status == 200 and ended and len(events(b"".join(payloads))) == 30 and payloads[-1] == b"data: [DONE]\n\n"
        assert [p.pieces for p in pumps] == [len(pieces) - 2], \
            "all but the first piece and the last went through the pump"
        assert sample(rt, "swapper_completion_tokens_total", model="tiny") == 30


@own
async def test_a_client_that_cannot_keep_up_gets_the_rest_from_the_event_loop(front, pumps):
    fat, n = b"x" * (128 << 10), 120  # 15 MiB of events after a small first one, read slowly

    async def script(e: Engine) -> None:
        await e.send(chunk(sse(0)))
        assert await eventually(lambda: any(_running(client))), "a pump took the stream"
        for i in range(1, n):
            e.writer.write(chunk(b"data: " + json.dumps({"choices": [{"text": fat.decode(), "index": 0}]}).encode() + b"\n\n"))
            await e.writer.drain()
        e.writer.write(chunk(sse(n, usage=True)) + chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")

    server, url = await Engine().serve(script)
    client, _, rt = await front(engine_url=url)
    [(status, _, body)] = await asyncio.to_thread(
        on_one_connection, client.port, [("/v1/completions", {**BODY, "stream": True})], "HTTP/1.1", True)
    got = events(body)
    assert status == 200 and len(got) == n + 1 and all(len(e["choices"][0]["text"]) == len(fat) for e in got[1:-1])
    assert pumps and pumps[0].result == pumping.BLOCKED and pumps[0].rest, "the pump stopped at a full socket"
    assert sample(rt, "swapper_completion_tokens_total", model="tiny") == n + 1
    server.close()


@own
async def test_framing_the_pump_does_not_read_strictly_goes_back_to_the_event_loop(front, pumps):
    ev = sse(5, usage=True)
    loose = b"%x \r\n%s\r\n" % (len(ev), ev)  # a size line with a space after the size

    async def script(e: Engine) -> None:
        await e.tokens(5)
        await e.send(loose)
        await e.send(chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")

    async with scripted(front, script) as (c, client, rt):
        status, payloads, ended = await c.stream(client.port)
        assert status == 200 and ended and len(events(b"".join(payloads))) == 6
        assert pumps[0].result == pumping.HANDBACK and pumps[0].rest == loose
        assert sample(rt, "swapper_completion_tokens_total", model="tiny") == 6


@own
async def test_the_usage_is_counted_when_a_large_last_piece_follows_it(front, pumps):
    """The pump keeps the payload's last bytes for the usage record; a last piece larger than
    what it keeps is handed back without having pushed the usage out of them."""
    fat = json.dumps({"choices": [{"text": "x" * (40 << 10), "index": 0}]}).encode()
    last = chunk(b"data: " + fat + b"\n\n") + chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"

    async def script(e: Engine) -> None:
        await e.tokens(6, usage_at=5)
        await e.send(last)

    async with scripted(front, script) as (c, client, rt):
        status, payloads, ended = await c.stream(client.port)
        assert status == 200 and ended and len(events(b"".join(payloads))) == 7
        assert pumps[0].result == pumping.HANDBACK and pumps[0].rest == last
        assert sample(rt, "swapper_completion_tokens_total", model="tiny") == 6


@own
async def test_a_child_silent_mid_stream_fails_after_the_read_timeout(front, pumps):
    gone = asyncio.Event()

    async def script(e: Engine) -> None:
        await e.tokens(2)
        await asyncio.wait_for(gone.wait(), 30)  # then nothing, until the test ends

    async with scripted(front, script, upstream_read_timeout=0.4) as (c, client, rt):
        t0 = time.monotonic()
        status, payloads, ended = await c.stream(client.port)
        took = time.monotonic() - t0
        assert status == 200 and not ended and len(events(b"".join(payloads) + b"data: ")) == 2, "the stream is cut"
        assert 0.4 <= took < 2.0, took
        assert [p.result for p in pumps] == [pumping.SILENT]
        assert await eventually(lambda: sample(rt, "swapper_requests_total", model="tiny", code="502") == 1)
        gone.set()


@own
async def test_a_child_closing_mid_stream_is_a_broken_answer(front, pumps):
    async def script(e: Engine) -> None:
        await e.tokens(4)  # and the connection closes without the body's end

    async with scripted(front, script) as (c, client, rt):
        status, payloads, ended = await c.stream(client.port)
        assert status == 200 and not ended and len(events(b"".join(payloads) + b"data: ")) == 4
        assert [p.result for p in pumps] == [pumping.EOF]
        assert await eventually(lambda: sample(rt, "swapper_requests_total", model="tiny", code="502") == 1)


@own
async def test_closing_the_childs_connection_stops_its_pump_first(front, pumps, monkeypatch):
    """The sockets are the event loop's again before one of them is closed (`Exchange.close`)."""
    exchanges: list[Exchange] = []
    start = Exchange._start_pump
    monkeypatch.setattr(Exchange, "_start_pump", lambda self, client: (exchanges.append(self), start(self, client))[1])
    client, engine, rt = await front()
    r = await client.post("/v1/completions", json={**BODY, "stream": True, "max_tokens": 2000, "pace": 0.005})
    assert (await r.content.readany()).startswith(b"data: ")
    assert await eventually(lambda: exchanges and exchanges[0]._pumped is not None)
    exchanges[0].close()
    assert [p.result for p in pumps] == [pumping.STOPPED] and exchanges[0]._pumped is None
    with pytest.raises(aiohttp.ClientPayloadError):  # the body was cut
        await r.read()
    assert await eventually(lambda: engine.cut)
    assert await eventually(lambda: sample(rt, "swapper_requests_total", model="tiny", code="502") == 1)


def _running(client: Any) -> list[Any]:
    """The pumps under way on the front's connections."""
    front_ = client.server.front
    return [c.relay.ex._pumped for c in front_.conns if c.relay is not None]


def test_the_pump_refuses_a_framing_state_it_cannot_continue() -> None:
    a, b = socket.socketpair()
    with a, b, pytest.raises(ValueError):
        pumping._pump.Pump(a.fileno(), b.fileno(), 1.0, 4, 0, b"", lambda: None)  # past the end
