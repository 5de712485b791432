"""swapper's own port (front.py): what it serves itself, what it hands to aiohttp, and the HTTP it
must get right on the way — keep-alive, pipelining, bodies in pieces, clients that leave, idle
connections, and every byte of a handed-over connection reaching aiohttp.

Raw sockets throughout: an HTTP client library would hide exactly what is tested here.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, AsyncIterator

import pytest

from httpfakes import OwnFrontTestServer, runtime
from polls import eventually


@pytest.fixture
async def port(tmp_path: Path) -> AsyncIterator[Any]:
    rt, launcher = runtime(tmp_path, max_body=4096)
    server = OwnFrontTestServer(rt)
    await server.start_server()
    yield server
    await server.close()


def chat(model: str = "a", **kw: Any) -> bytes:
    return json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}], **kw}).encode()


def post(body: bytes, path: str = "/v1/chat/completions", extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{extra}"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


class Conn:
    """One client connection, reading answers as HTTP/1.1 frames them."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, server: OwnFrontTestServer) -> Conn:
        return cls(*await asyncio.open_connection(server.host, server.port))

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def answer(self) -> tuple[int, dict[str, str], bytes]:
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 10)
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:] if ": " in line)}
        status = int(lines[0].split()[1])
        if 100 <= status < 200:  # an interim answer (100 Continue): no body
            return status, headers, b""
        if "content-length" in headers:
            body = await asyncio.wait_for(self.reader.readexactly(int(headers["content-length"])), 10)
        elif headers.get("transfer-encoding") == "chunked":
            parts = []
            while True:
                size = int((await asyncio.wait_for(self.reader.readline(), 10)).strip(), 16)
                chunk = await asyncio.wait_for(self.reader.readexactly(size + 2), 10)
                if size == 0:
                    break
                parts.append(chunk[:-2])
            body = b"".join(parts)
        else:
            body = await asyncio.wait_for(self.reader.read(), 10)
        return status, headers, body

    async def closed_by_server(self, timeout: float = 10.0) -> bool:
        try:
            return await asyncio.wait_for(self.reader.read(), timeout) == b""
        except (asyncio.TimeoutError, ConnectionError):
            return False

    def close(self) -> None:
        self.writer.close()


async def test_a_plain_proxied_request_is_served_without_aiohttp_and_the_connection_stays_open(port):
    c = await Conn.open(port)
    for _ in range(3):
        await c.send(post(chat()))
        status, headers, body = await c.answer()
        assert status == 200 and json.loads(body)["model"] == "a"
        assert "x-request-id" in headers and headers.get("connection") != "close"
    assert port.front.handoffs == 0 and len(port.front.conns) == 1
    c.close()


async def test_other_routes_on_the_same_connection_are_handed_to_aiohttp_with_every_byte(port):
    c = await Conn.open(port)
    await c.send(post(chat()))
    assert (await c.answer())[0] == 200
    # a GET and a POST sent together: aiohttp takes over from the GET, and gets the POST too
    await c.send(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n" + post(chat()))
    status, _, body = await c.answer()
    assert status == 200 and {m["id"] for m in json.loads(body)["data"]} >= {"a", "b"}
    status, _, body = await c.answer()
    assert status == 200 and json.loads(body)["model"] == "a"
    assert port.front.handoffs == 1
    c.close()


async def test_pipelined_requests_are_answered_in_order(port):
    c = await Conn.open(port)
    await c.send(post(chat("a")) + post(chat("b")) + post(chat("a", stream=True, max_tokens=2)))
    assert json.loads((await c.answer())[2])["model"] == "a"
    assert json.loads((await c.answer())[2])["model"] == "b"
    status, headers, body = await c.answer()
    assert status == 200 and body.count(b"data: ") == 3 and body.endswith(b"data: [DONE]\n\n")
    assert port.front.handoffs == 0
    c.close()


async def test_a_stream_goes_from_the_childs_connection_straight_to_the_clients(port, monkeypatch):
    from swapper.relay import Exchange

    directs: list[Any] = []
    direct = Exchange.direct
    monkeypatch.setattr(Exchange, "direct", lambda self, w, client=None: (directs.append(w), direct(self, w, client)))
    c = await Conn.open(port)
    await c.send(post(chat(stream=True, max_tokens=40)))
    status, headers, body = await c.answer()
    assert status == 200 and body.count(b"data: ") == 41 and body.endswith(b"data: [DONE]\n\n")
    assert len(directs) == 1, "after the first piece, the relay is out of the way"
    await c.send(post(chat()))  # and the connection serves the next request
    assert json.loads((await c.answer())[2])["model"] == "a"
    c.close()


async def test_a_body_arriving_in_pieces_is_read_whole(port):
    c = await Conn.open(port)
    body = chat(pad="x" * 1500)
    data = post(body)
    for i in range(0, len(data), 97):
        await c.send(data[i:i + 97])
        await asyncio.sleep(0)
    status, _, answer = await c.answer()
    assert status == 200 and json.loads(answer)["model"] == "a"
    assert port.front.handoffs == 0
    c.close()


@pytest.mark.parametrize("head, status, code", [
    ("Content-Length: 99999\r\n", 413, "request_too_large"),  # over --max-body
    ("Content-Length: 12\r\nContent-Length: 13\r\n", 400, "invalid_request"),
    ("Content-Length: x1\r\n", 400, "invalid_request"),
])
async def test_requests_it_does_not_take_get_aiohttps_json_errors(port, head, status, code):
    c = await Conn.open(port)
    await c.send(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n{head}\r\n".encode() + b"{}")
    got, headers, body = await c.answer()
    assert got == status, body
    assert headers["content-type"].startswith("application/json")
    assert json.loads(body)["error"]["code"] == code
    assert port.front.handoffs == 1
    c.close()


@pytest.mark.parametrize("extra", [
    "Transfer-Encoding: chunked\r\n",  # a body without a length
    "Expect: 100-continue\r\n",
    "X-Title: caf\u00e9\r\n",  # a header value outside ASCII
])
async def test_requests_it_does_not_take_are_still_served_by_aiohttp(port, extra):
    body = chat()
    if "chunked" in extra:
        data = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode("utf-8")
                + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
    else:
        data = post(body, extra=extra).replace(b"caf\xc3\xa9", "café".encode())
    c = await Conn.open(port)
    await c.send(data)
    status, _, answer = await c.answer()
    if status == 100:
        status, _, answer = await c.answer()
    assert status == 200 and json.loads(answer)["model"] == "a"
    assert port.front.handoffs == 1
    c.close()


async def test_an_http_1_0_client_is_served_and_closed(port):
    c = await Conn.open(port)
    await c.send(post(chat()).replace(b"HTTP/1.1", b"HTTP/1.0"))
    status, _, body = await c.answer()
    assert status == 200 and json.loads(body)["model"] == "a"
    assert await c.closed_by_server()


@pytest.mark.parametrize("body, status", [(chat(stream=True), 200), (chat(), 200), (chat("nope"), 404)])
async def test_connection_close_from_the_client_closes_after_the_answer(port, body, status):
    c = await Conn.open(port)
    await c.send(post(body, extra="Connection: close\r\n"))
    got, headers, answer = await c.answer()
    assert got == status and headers["connection"] == "close"
    assert answer.endswith(b"data: [DONE]\n\n") if b"stream" in body else json.loads(answer)
    assert await c.closed_by_server()
    assert port.front.handoffs == 0


async def test_an_error_answer_carries_the_request_id_and_keeps_the_connection(port):
    c = await Conn.open(port)
    await c.send(post(chat("nope"), extra="X-Request-ID: trace-9\r\n"))
    status, headers, body = await c.answer()
    assert status == 404 and headers["x-request-id"] == "trace-9"
    assert headers["content-type"].startswith("application/json")
    assert json.loads(body)["error"]["code"] == "model_not_found"
    await c.send(post(b"not json"))
    status, _, body = await c.answer()
    assert status == 400 and "not valid JSON" in json.loads(body)["error"]["message"]
    await c.send(post(chat()))
    assert (await c.answer())[0] == 200
    assert port.front.handoffs == 0
    c.close()


async def test_a_client_that_leaves_mid_stream_frees_the_model(port):
    c = await Conn.open(port)
    await c.send(post(chat(stream=True, hold=True, max_tokens=3)))
    await asyncio.wait_for(c.reader.readuntil(b"data: "), 10)  # the first token is out
    rt = port.rt
    assert rt.scheduler.models["a"].inflight == 1
    c.close()
    await eventually(lambda: rt.scheduler.models["a"].inflight == 0, timeout=4.0)  # cancelled, released
    assert rt.scheduler.models["a"].inflight == 0
    assert not port.front.conns


async def test_idle_connections_are_closed_after_the_keepalive_time(port):
    port.front.keepalive = 0.2
    c = await Conn.open(port)
    await c.send(post(chat()))
    assert (await c.answer())[0] == 200
    assert await c.closed_by_server(timeout=10.0)


async def test_closing_lets_a_stream_under_way_finish_and_stops_listening(port):
    c = await Conn.open(port)
    await c.send(post(chat(stream=True, hold=True, max_tokens=3)))
    await asyncio.wait_for(c.reader.readuntil(b"data: "), 10)
    idle = await Conn.open(port)
    closing = asyncio.ensure_future(port.front.close(10.0))
    assert await idle.closed_by_server(), "an idle connection is closed at once"
    port.rt.launcher.children["a"].stream_gate.set()
    rest = await asyncio.wait_for(c.reader.read(), 10)
    assert rest.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")
    await asyncio.wait_for(closing, 10)
    with pytest.raises(OSError):
        await asyncio.open_connection(port.host, port.port)


async def test_mangled_requests_get_an_answer_or_a_close_and_never_an_unhandled_error(port, caplog):
    import random

    rng = random.Random(17)
    valid = post(chat(), extra="X-Request-ID: r-1\r\n")
    cases = [valid[:i] for i in range(0, len(valid), 7)]  # every truncation, every few bytes
    for _ in range(120):
        data = bytearray(valid)
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(data))
            op = rng.randrange(3)
            if op == 0:
                data[at] = rng.randrange(256)
            elif op == 1:
                data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
            else:
                del data[at:at + rng.randint(1, 8)]
        cases.append(bytes(data))
    printable = [bytes([c]) for c in range(0x20, 0x7f)]
    for _ in range(60):  # the fields this reader interprets itself, with printable garbage
        value = b"".join(rng.choice(printable) for _ in range(rng.randint(0, 6)))
        name = rng.choice([b"Content-Length", b"Connection", b"X-Request-ID", b"Transfer-Encoding"])
        cases.append(valid.replace(b"Content-Type", name + b": " + value + b"\r\nContent-Type", 1))
        cases.append(valid.replace(b"Content-Length: ", b"Content-Length: " + value, 1))
    with caplog.at_level("WARNING"):
        for data in cases:
            reader, writer = await asyncio.open_connection(port.host, port.port)
            writer.write(data)
            writer.write_eof()
            got = await asyncio.wait_for(reader.read(), 10)  # an answer or a close, never a hang
            assert not got or got.startswith(b"HTTP/1.1 "), got[:80]
            writer.close()
    unhandled = [r for r in caplog.records if r.exc_info or "Fatal error" in r.getMessage()
                 or "Exception in callback" in r.getMessage()]
    assert not unhandled, unhandled[0].getMessage()
    c = await Conn.open(port)  # and the port still serves
    await c.send(post(chat()))
    assert (await c.answer())[0] == 200
    c.close()
