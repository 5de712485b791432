"""A stream relayed by a pump thread (swapper/_pump.c, pumping.py) on swapper's own port.

Each test checks that the pump ran (and how it stopped) as well as what the client and the
metrics saw, so that a path the pump hands back to the event loop is known to have been taken:
the answer's end, a client that leaves, a client that cannot keep up, a child that goes silent
or closes, framing the pump does not read strictly, and a stop asked for.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import time
from typing import Any, Awaitable, Callable

import aiohttp
import pytest

from swapper import pumping
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


async def first_tokens(w: asyncio.StreamWriter, n: int, usage_at: int = -1) -> None:
    """The head and `n` events, each in its own piece, as an engine generates them."""
    w.write(HEAD + chunk(sse(0, usage=usage_at == 0)))
    for i in range(1, n):
        await asyncio.sleep(0.005)  # the engine's pace: a token every 5 ms
        w.write(chunk(sse(i, usage=usage_at == i)))
    await asyncio.sleep(0.005)


async def scripted(script: Callable[[asyncio.StreamWriter], Awaitable[None]]) -> tuple[asyncio.Server, str]:
    """An engine that reads a request, then writes what `script` writes (raw bytes, any framing)."""
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        try:
            await script(writer)
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


async def stream_of(client: Any) -> tuple[int, bytes, bool]:
    """A stream's status, the bytes the client got, and whether the chunked body ended."""
    r = await client.post("/v1/completions", json={**BODY, "stream": True})
    got = b""
    try:
        while piece := await r.content.readany():
            got += piece
    except aiohttp.ClientPayloadError:  # the body was cut
        return r.status, got, False
    return r.status, got, True


@own
@pytest.mark.parametrize("seed", range(6))
async def test_a_stream_in_pieces_cut_anywhere_arrives_whole(front, pumps, seed):
    """The engine's bytes cut at random places (inside size lines, payloads and line ends) and
    sent one by one: the pump reads the framing across the cuts."""
    body = HEAD + b"".join(chunk(sse(i, usage=i == 29)) for i in range(30)) + chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"
    rng = random.Random(seed)
    head_end = len(HEAD) + len(chunk(sse(0)))  # the head and the first chunk come together
    cuts = sorted(rng.sample(range(head_end + 1, len(body)), 60))
    pieces = [body[:head_end]] + [body[a:b] for a, b in zip([head_end] + cuts, cuts + [len(body)])]

    async def script(w: asyncio.StreamWriter) -> None:
        for p in pieces:
            w.write(p)
            await w.drain()
            await asyncio.sleep(0.001)  # each its own read

    server, url = await scripted(script)
    client, _, rt = await front(engine_url=url)
    status, got, ended = await stream_of(client)
    assert status == 200 and ended and len(events(got)) == 30 and got.endswith(b"data: [DONE]\n\n")
    assert pumps and pumps[0].pieces > 10
    assert sample(rt, "swapper_completion_tokens_total", model="tiny") == 30
    server.close()


@own
async def test_a_client_that_cannot_keep_up_gets_the_rest_from_the_event_loop(front, pumps):
    fat, n = b"x" * (128 << 10), 120  # 15 MiB of events after a small first one, read slowly

    async def script(w: asyncio.StreamWriter) -> None:
        w.write(HEAD + chunk(sse(0)))
        await asyncio.sleep(0.01)
        for i in range(1, n):
            w.write(chunk(b"data: " + json.dumps({"choices": [{"text": fat.decode(), "index": 0}]}).encode() + b"\n\n"))
            await w.drain()
        w.write(chunk(sse(n, usage=True)) + chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")

    server, url = await scripted(script)
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
    async def script(w: asyncio.StreamWriter) -> None:
        await first_tokens(w, 5)
        ev = sse(5, usage=True)
        w.write(b"%x \r\n%s\r\n" % (len(ev), ev))  # a size line with a space after the size
        await asyncio.sleep(0.005)
        w.write(chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")

    server, url = await scripted(script)
    client, _, rt = await front(engine_url=url)
    status, got, ended = await stream_of(client)
    assert status == 200 and ended and len(events(got)) == 6
    assert pumps[0].result == pumping.HANDBACK and b"%x \r\n" % len(sse(5, True)) in pumps[0].rest
    assert sample(rt, "swapper_completion_tokens_total", model="tiny") == 6
    server.close()


@own
async def test_the_usage_is_counted_when_a_large_last_piece_follows_it(front, pumps):
    """The pump keeps the payload's last bytes for the usage record; a last piece larger than
    what it keeps is handed back without having pushed the usage out of them."""
    async def script(w: asyncio.StreamWriter) -> None:
        await first_tokens(w, 6, usage_at=5)
        fat = json.dumps({"choices": [{"text": "x" * (40 << 10), "index": 0}]}).encode()
        w.write(chunk(b"data: " + fat + b"\n\n") + chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")

    server, url = await scripted(script)
    client, _, rt = await front(engine_url=url)
    status, got, ended = await stream_of(client)
    assert status == 200 and ended and len(events(got)) == 7
    assert pumps[0].result == pumping.HANDBACK and len(pumps[0].rest) > 40 << 10
    assert sample(rt, "swapper_completion_tokens_total", model="tiny") == 6
    server.close()


@own
async def test_a_child_silent_mid_stream_fails_after_the_read_timeout(front, pumps):
    gone = asyncio.Event()

    async def script(w: asyncio.StreamWriter) -> None:
        await first_tokens(w, 2)
        await asyncio.wait_for(gone.wait(), 30)  # then nothing, until the test ends

    server, url = await scripted(script)
    client, _, rt = await front(engine_url=url, upstream_read_timeout=0.4)
    t0 = time.monotonic()
    status, got, ended = await stream_of(client)
    took = time.monotonic() - t0
    assert status == 200 and not ended and len(events(got + b"data: ")) == 2, "the client's stream is cut"
    assert 0.4 <= took < 2.0, took
    assert [p.result for p in pumps] == [pumping.SILENT]
    assert await eventually(lambda: sample(rt, "swapper_requests_total", model="tiny", code="502") == 1)
    gone.set()
    server.close()


@own
async def test_a_child_closing_mid_stream_is_a_broken_answer(front, pumps):
    async def script(w: asyncio.StreamWriter) -> None:
        await first_tokens(w, 4)  # and the connection closes without the body's end

    server, url = await scripted(script)
    client, _, rt = await front(engine_url=url)
    status, got, ended = await stream_of(client)
    assert status == 200 and not ended and len(events(got + b"data: ")) == 4
    assert [p.result for p in pumps] == [pumping.EOF]
    assert await eventually(lambda: sample(rt, "swapper_requests_total", model="tiny", code="502") == 1)
    server.close()


@own
async def test_closing_the_childs_connection_stops_its_pump_first(front, pumps, monkeypatch):
    """The sockets are the event loop's again before one of them is closed (`Exchange.close`)."""
    exchanges: list[Exchange] = []
    start = Exchange._start_pump
    monkeypatch.setattr(Exchange, "_start_pump", lambda self: (exchanges.append(self), start(self))[1])
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
