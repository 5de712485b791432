"""The request path in one process: swapper's app in front of a stand-in engine (no child processes).

These pin down what the hot path must keep doing however it is made cheaper: keys when they are
set (and an open door when none are), request IDs, CORS, errors, usage counted from plain and
streamed answers, and bodies forwarded byte for byte. The real-process versions of these live in
test_keys.py, test_metrics.py and test_serve_real.py.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from swapper import backends
from swapper.app import build_runtime, create_app
from swapper.config import ModelSpec, Settings
from swapper.gpu import FakeProbe
from swapper.downstream import may_round, parse_json
from swapper.proxy import UsageSniffer
from swapper.relay import Exchange
from swapper.synth import write_model

from httpfakes import OwnFrontTestServer
from polls import eventually

MiB = 1 << 20


@dataclass
class StandIn:
    """An engine answering completions like llama-server, remembering the bodies it got."""

    bodies: list[bytes] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    cut: list[int] = field(default_factory=list)
    end_released: asyncio.Event = field(default_factory=asyncio.Event)  # for `hold_end` streams

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/health", self.health)
        return app

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        self.bodies.append(raw)
        self.headers.append(dict(request.headers))
        body = json.loads(raw)
        if "big" in body:  # an answer of that many bytes
            return web.json_response({"text": "x" * int(body["big"]), "usage": {"completion_tokens": 1}})
        n = int(body.get("max_tokens", 4))
        usage = {"prompt_tokens": 3, "completion_tokens": n, "total_tokens": n + 3}
        if not body.get("stream"):
            return web.json_response({"choices": [{"text": " a" * n, "index": 0}], "usage": usage})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            for i in range(n):
                event: dict[str, Any] = {"choices": [{"text": "x" * int(body.get("fat", 0)) or " a", "index": 0}]}
                if i == n - 1:
                    event["usage"] = usage
                await resp.write(b"data: " + json.dumps(event).encode() + b"\n\n")
                if body.get("pace"):  # a token every `pace` seconds, like a slow engine
                    await asyncio.sleep(float(body["pace"]))
        except (ConnectionError, asyncio.CancelledError):
            self.cut.append(i)  # the connection to it was closed mid-stream
            raise
        await resp.write(b"data: [DONE]\n\n")
        if body.get("hold_end"):  # the end of the chunked body waits for the test's word
            await asyncio.wait_for(self.end_released.wait(), 30)
        await resp.write_eof()
        return resp


@dataclass
class Instance:
    base_url: str
    backend: Any
    pid: int = 4242

    def pids(self) -> list[int]:
        return [self.pid]

    def process_alive(self) -> bool:
        return True


@dataclass
class StandInLauncher:
    """Starts nothing: every model's "child" is the stand-in engine's URL."""

    url: str
    settings: Settings

    async def start(self, entry: Any, reserved: int, on_exit: Callable[[int | None], None]) -> Instance:
        return Instance(self.url, backends.get(entry.engine, self.settings))

    async def stop(self, instance: Instance, entry: Any) -> None:
        return None

    def can_sleep(self, entry: Any) -> bool:
        return False

    def prefetch(self, entry: Any) -> None:
        return None


@pytest.fixture(scope="module")
def gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("models") / "tiny.gguf"
    write_model(path, size_bytes=1 * MiB, seed=3, ctx=512)
    return path


@pytest.fixture(params=["own", "aiohttp"])
async def front(request: pytest.FixtureRequest, tmp_path: Path, gguf: Path):  # noqa: ANN201
    """A factory: swapper's app with the given settings, in front of a fresh stand-in engine;
    served on swapper's own port (front.py, as `serve` runs it) and by aiohttp alone (the
    path a connection takes once front.py hands it over)."""
    made: list[TestClient] = []

    async def make(engine_url: str | None = None, **settings: Any) -> tuple[TestClient, StandIn, Any]:
        engine = StandIn()
        upstream = TestServer(engine.app())
        await upstream.start_server()
        st = Settings(state_dir=str(tmp_path / "state"), device="cpu", reserve=0,
                      models={"tiny": ModelSpec(name="tiny", path=str(gguf), footprint=8 * MiB)}, **settings)
        url = engine_url or str(upstream.make_url("")).rstrip("/")
        rt = build_runtime(st, probe=FakeProbe(), launcher=StandInLauncher(url, st))
        server = OwnFrontTestServer(rt) if request.param == "own" else TestServer(create_app(rt))
        client = TestClient(server)
        await client.start_server()
        made.append(client)
        made.append(upstream)  # type: ignore[arg-type]
        return client, engine, rt

    yield make
    for c in made:
        await c.close()


def sample(rt: Any, name: str, **labels: str) -> float:
    """One sample of the runtime's Prometheus registry (0 when absent)."""
    for family in rt.metrics.registry.collect():
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return s.value
    return 0.0


BODY = {"model": "tiny", "prompt": "x", "max_tokens": 3}


async def test_without_keys_every_route_is_open(front):
    client, _, _ = await front()
    r = await client.post("/v1/completions", json=BODY)
    assert r.status == 200, await r.text()
    assert (await client.get("/v1/models")).status == 200


async def test_keys_are_enforced_on_the_proxy_path_when_set(front):
    client, engine, _ = await front(api_keys=["k-1234"])
    r = await client.post("/v1/completions", json=BODY)
    assert r.status == 401 and (await r.json())["error"]["code"] == "invalid_api_key"
    assert r.headers["WWW-Authenticate"] == "Bearer"
    assert (await client.post("/v1/completions", json=BODY, headers={"Authorization": "Bearer nope"})).status == 401
    assert engine.bodies == [], "a refused request never reaches the engine"
    r = await client.post("/v1/completions", json=BODY, headers={"Authorization": "Bearer k-1234"})
    assert r.status == 200
    assert "authorization" not in {k.lower() for k in engine.headers[-1]}, "keys are not passed on"
    assert (await client.get("/health/live")).status == 200, "probes stay open"


async def test_admin_keys_alone_guard_admin_routes_only(front):
    client, _, _ = await front(admin_keys=["adm-1"])
    assert (await client.post("/models/load", json={"model": "tiny"})).status == 401
    assert (await client.post("/v1/completions", json=BODY)).status == 200


async def test_request_ids_are_kept_or_generated(front):
    client, engine, _ = await front()
    r = await client.post("/v1/completions", json=BODY, headers={"X-Request-ID": "trace-1"})
    assert r.headers["X-Request-ID"] == "trace-1" and engine.headers[-1]["X-Request-ID"] == "trace-1"
    r = await client.post("/v1/completions", json={**BODY, "stream": True}, headers={"X-Request-ID": "bad id"})
    await r.read()
    rid = r.headers["X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{32}", rid) and engine.headers[-1]["X-Request-ID"] == rid
    other = (await client.get("/v1/models")).headers["X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{32}", other) and other != rid


async def test_access_log_line_per_request(front, caplog: pytest.LogCaptureFixture):
    client, _, _ = await front()
    with caplog.at_level("INFO", logger="swapper.access"):
        await client.post("/v1/completions", json=BODY, headers={"X-Request-ID": "log-me"})
        await client.get("/?api_key=secret-1")
    lines = [r.getMessage() for r in caplog.records if r.name == "swapper.access"]
    assert any(re.fullmatch(r"log-me POST /v1/completions 200 \d+\.\dms", x) for x in lines), lines
    assert not any("secret-1" in x for x in lines)


async def test_cors_only_when_an_origin_is_configured(front):
    client, _, _ = await front()
    r = await client.options("/v1/completions", headers={"Origin": "https://ui.example",
                                                         "Access-Control-Request-Method": "POST"})
    assert "Access-Control-Allow-Origin" not in r.headers
    client, _, _ = await front(cors_origins=["https://ui.example"], api_keys=["k-1"])
    r = await client.options("/v1/completions", headers={"Origin": "https://ui.example",
                                                         "Access-Control-Request-Method": "POST"})
    assert r.status == 204 and r.headers["Access-Control-Allow-Origin"] == "https://ui.example"
    r = await client.get("/v1/models", headers={"Origin": "https://ui.example", "Authorization": "Bearer k-1"})
    assert r.headers["Access-Control-Allow-Origin"] == "https://ui.example"


async def test_errors_keep_their_shape(front):
    client, _, _ = await front()
    r = await client.post("/v1/completions", data=b"{nope", headers={"Content-Type": "application/json"})
    assert r.status == 400 and (await r.json())["error"]["message"].startswith("request body is not valid JSON")
    r = await client.post("/v1/completions", json=[1, 2])
    assert r.status == 400 and (await r.json())["error"]["message"] == "request body must be a JSON object"
    r = await client.get("/no/such/route")
    assert r.status == 404 and (await r.json())["error"]["code"] == "not_found"
    r = await client.post("/v1/completions", json={**BODY, "model": "ghost"})
    assert r.status == 404 and (await r.json())["error"]["code"] == "model_not_found"


async def test_oversized_body_is_refused(front):
    client, engine, _ = await front(max_body=1000)
    r = await client.post("/v1/completions", json={**BODY, "prompt": "x" * 2000})
    assert r.status == 413 and (await r.json())["error"]["code"] == "request_too_large"
    assert engine.bodies == []


async def test_body_is_forwarded_byte_for_byte(front):
    client, engine, _ = await front()
    raw = b'{"model":"tiny",  "prompt":"x", "max_tokens":2, "seed": 123456789012345678901234567890, "t": NaN}'
    r = await client.post("/v1/completions", data=raw, headers={"Content-Type": "application/json"})
    assert r.status == 200
    assert engine.bodies[-1] == raw, "what the standard library accepts is passed on untouched"


async def test_a_body_the_engine_rewrites_keeps_every_number_as_sent(front, monkeypatch):
    class Renaming:
        def rewrite(self, path: str, body: dict[str, Any], entry: Any, adapter: Any) -> dict[str, Any]:
            return {**body, "model": "served-name"}

    monkeypatch.setattr(backends, "get", lambda engine, settings: Renaming())
    client, engine, _ = await front()
    raw = b'{"model":"tiny", "prompt":"x", "max_tokens":2, "seed": 123456789012345678901234567890}'
    r = await client.post("/v1/completions", data=raw, headers={"Content-Type": "application/json"})
    assert r.status == 200
    sent = json.loads(engine.bodies[-1])
    assert sent["model"] == "served-name" and sent["seed"] == 123456789012345678901234567890


def test_json_bodies_read_as_the_standard_library_reads_them():
    for raw in (b'{"a": NaN, "b": 1e400}', b'\xef\xbb\xbf{"a": 1}', b'{"a": "\\ud800"}', b'{"a": [1, 2.5, null]}',
                b'{"a": -922337203685477580, "b": 999999999999999999}'):
        assert repr(parse_json(raw)) == repr(json.loads(raw)), raw
        assert not may_round(raw), raw
    for big in (b'{"a": 18446744073709551616}', b'{"a": -9223372036854775809}', b'{"a": 9223372036854775807}'):
        assert may_round(big), "an integer that may not fit in 64 bits is said to be at risk"
    for bad in (b'{"a": "\xff"}', b'{"a": 1', b""):
        with pytest.raises(ValueError):
            parse_json(bad)


async def test_usage_is_counted_from_plain_and_streamed_answers(front):
    client, _, rt = await front()
    r = await client.post("/v1/completions", json={**BODY, "max_tokens": 4})
    assert (await r.json())["usage"]["completion_tokens"] == 4
    r = await client.post("/v1/completions", json={**BODY, "max_tokens": 6, "stream": True})
    text = await r.text()
    assert r.status == 200 and text.count("data: ") == 7
    assert sample(rt, "swapper_completion_tokens_total", model="tiny") == 10
    assert sample(rt, "swapper_prompt_tokens_total", model="tiny") == 6
    assert sample(rt, "swapper_requests_total", model="tiny", code="200") == 2
    assert sample(rt, "swapper_time_to_first_byte_seconds_count", model="tiny") == 2
    await client.post("/v1/completions", json={**BODY, "model": "ghost"})
    assert sample(rt, "swapper_requests_total", model="unknown", code="404") == 1


def test_usage_sniffer_takes_the_last_usage_object():
    s = UsageSniffer()
    s.feed(b'data: {"usage": {"completion_tokens": 1}}\n\ndata: {"text": "\\"usage\\": 5"}\n\n')
    s.feed(b'data: {"choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 9, "x": {"y": 1}}}\n\n')
    s.feed(b"data: [DONE]\n\n")
    assert s.usage() == {"prompt_tokens": 2, "completion_tokens": 9, "x": {"y": 1}}
    assert UsageSniffer().usage() is None
    broken = UsageSniffer()
    broken.feed(b'{"usage": {"completion_tokens": 3}, "text": "no \\"usage\\" here"}')
    assert broken.usage() == {"completion_tokens": 3}, "an escaped mention is not a usage object"


def test_usage_sniffer_keeps_the_tail_of_a_long_answer():
    s = UsageSniffer(pieces=8)
    for _ in range(500):
        s.feed(b'data: {"choices": [{"text": "a"}]}\n\n')
    s.feed(b'data: {"usage": {"completion_tokens": 500}}\n\n')
    assert len(s.pieces) == 8 and s.usage() == {"completion_tokens": 500}


# ------------------------------------------------------------------------------ the relay, as clients see it


def on_one_connection(port: int, requests: list[tuple[str, dict[str, Any]]], version: str = "HTTP/1.1",
         slow: bool = False) -> list[tuple[int, dict[str, str], bytes]]:
    """Requests sent one after another on one connection, with the standard library's client
    (it parses framing strictly and refuses to reuse a connection it cannot trust)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    if version == "HTTP/1.0":
        conn._http_vsn, conn._http_vsn_str = 10, "HTTP/1.0"  # type: ignore[attr-defined]
    out = []
    for path, body in requests:
        conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        if slow:
            data = b""
            while chunk := r.read(256 << 10):
                data += chunk
                time.sleep(0.01)
        else:
            data = r.read()
        out.append((r.status, {k.lower(): v for k, v in r.getheaders()}, data))
        if r.will_close:
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.close()
    return out


async def test_a_kept_alive_client_sends_its_next_request_after_a_stream_on_the_same_connection(front):
    client, _, _ = await front()
    answers = await asyncio.to_thread(on_one_connection, client.port, [
        ("/v1/completions", {**BODY, "stream": True, "max_tokens": 5}),
        ("/v1/completions", BODY), ("/v1/completions", {**BODY, "stream": True})])
    assert [a[0] for a in answers] == [200, 200, 200]
    stream, plain, _ = answers
    assert stream[1]["transfer-encoding"] == "chunked" and "connection" not in stream[1]
    assert stream[2].count(b"data: ") == 6 and stream[2].endswith(b"data: [DONE]\n\n")
    assert json.loads(plain[2])["usage"]["completion_tokens"] == 3


async def test_an_http10_client_gets_the_stream_without_chunks_and_then_the_close(front):
    client, _, rt = await front()
    [(status, headers, body)] = await asyncio.to_thread(
        on_one_connection, client.port, [("/v1/completions", {**BODY, "stream": True, "max_tokens": 4})], "HTTP/1.0")
    assert status == 200 and "transfer-encoding" not in headers
    assert body.count(b"data: ") == 5 and body.endswith(b"data: [DONE]\n\n")
    assert sample(rt, "swapper_completion_tokens_total", model="tiny") == 4


async def test_an_answer_that_ends_with_the_engines_connection_reaches_the_client_chunked(front):
    async def engine(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\ndata: a\n\n")
        await writer.drain()
        writer.write(b'data: {"usage": {"completion_tokens": 2}}\n\n')
        writer.close()

    server = await asyncio.start_server(engine, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client, _, rt = await front(engine_url=f"http://127.0.0.1:{port}")
    answers = await asyncio.to_thread(on_one_connection, client.port, [("/v1/completions", BODY)] * 2)
    for status, headers, body in answers:
        assert status == 200 and headers["transfer-encoding"] == "chunked"
        assert body == b'data: a\n\ndata: {"usage": {"completion_tokens": 2}}\n\n'
    assert sample(rt, "swapper_completion_tokens_total", model="tiny") == 4
    server.close()


async def test_a_stream_whose_first_token_came_with_the_head_is_relayed_whole(front, request, monkeypatch):
    async def engine(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        events = [b"data: %d\n\n" % i for i in range(4)] + [b'data: {"usage": {"completion_tokens": 4}}\n\n']
        chunks = [b"%x\r\n%s\r\n" % (len(e), e) for e in events]
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
                     b"Connection: close\r\n\r\n" + chunks[0])
        for c in chunks[1:]:
            await writer.drain()
            await asyncio.sleep(0.01)
            writer.write(c)
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        writer.close()

    from swapper.downstream import Downstream

    writes: list[bytes] = []
    write = Downstream.write
    monkeypatch.setattr(Downstream, "write", lambda self, data: (writes.append(data), write(self, data)))
    server = await asyncio.start_server(engine, "127.0.0.1", 0)
    client, _, rt = await front(engine_url=f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
    r = await client.post("/v1/completions", json={**BODY, "stream": True})
    body = await r.read()
    assert r.status == 200 and body == b"".join(b"data: %d\n\n" % i for i in range(4)) + \
        b'data: {"usage": {"completion_tokens": 4}}\n\n'
    if request.node.callspec.params["front"] == "own":  # the later pieces bypass the relay's code
        assert len(writes) == 1, writes
    else:
        assert len(writes) >= 5
    assert sample(rt, "swapper_completion_tokens_total", model="tiny") == 4
    server.close()


async def test_a_large_answer_to_a_slow_reader_arrives_whole_with_the_engine_paused_meanwhile(front, monkeypatch):
    pauses = []
    pause = Exchange.pause
    monkeypatch.setattr(Exchange, "pause", lambda self: (pauses.append(1), pause(self)))
    client, _, _ = await front()
    size = 24 << 20  # many times the relay's high-water mark and the sockets' buffers
    [(status, _, body)] = await asyncio.to_thread(on_one_connection, client.port,
                                                  [("/v1/completions", {**BODY, "big": size})], "HTTP/1.1", True)
    assert status == 200 and json.loads(body)["text"] == "x" * size
    assert pauses, "the engine's connection was paused while the client fell behind"


async def test_a_long_stream_to_a_slow_reader_arrives_whole_with_the_engine_paused_meanwhile(front, monkeypatch):
    pauses = []
    pause = Exchange.pause
    monkeypatch.setattr(Exchange, "pause", lambda self: (pauses.append(1), pause(self)))
    client, _, rt = await front()
    tokens, fat = 160, 128 << 10  # 20 MiB of events: many times every buffer on the way
    [(status, headers, body)] = await asyncio.to_thread(
        on_one_connection, client.port,
        [("/v1/completions", {**BODY, "stream": True, "max_tokens": tokens, "fat": fat})], "HTTP/1.1", True)
    assert status == 200 and headers["transfer-encoding"] == "chunked"
    events = [json.loads(e) for e in body.decode().split("data: ")[1:-1]]
    assert len(events) == tokens and all(len(e["choices"][0]["text"]) == fat for e in events)
    assert body.endswith(b"data: [DONE]\n\n")
    assert pauses, "the engine's connection was paused while the client fell behind"
    assert sample(rt, "swapper_completion_tokens_total", model="tiny") == tokens


async def test_relayed_answers_carry_the_request_id_and_cors_headers(front):
    client, _, _ = await front(cors_origins=["https://ui.example"])
    for body in ({**BODY, "big": 1 << 20}, {**BODY, "stream": True}):  # several reads each
        r = await client.post("/v1/completions", json=body, headers={"Origin": "https://ui.example",
                                                                     "X-Request-ID": "rid-7"})
        await r.read()
        assert r.headers["X-Request-ID"] == "rid-7"
        assert r.headers["Access-Control-Allow-Origin"] == "https://ui.example"
        assert r.headers["Date"] and r.headers["Server"]


async def test_a_client_that_leaves_mid_stream_is_a_499_and_the_engine_connection_is_closed(front):
    client, engine, rt = await front()
    r = await client.post("/v1/completions", json={**BODY, "stream": True, "max_tokens": 2000, "pace": 0.005})
    assert r.status == 200 and (await r.content.readany()).startswith(b"data: ")
    r.close()  # the client leaves after its first token: the next tokens find it gone
    await eventually(lambda: engine.cut and sample(rt, "swapper_requests_total", model="tiny", code="499") == 1)
    assert engine.cut and engine.cut[0] < 1999, "the engine stopped writing long before its last token"
    assert sample(rt, "swapper_requests_total", model="tiny", code="499") == 1
    assert sample(rt, "swapper_requests_total", model="tiny", code="502") == 0, "the client left: not an engine error"


async def test_a_client_that_closes_at_the_done_event_has_its_stream_counted_as_answered(front):
    """OpenAI's client stops reading at `data: [DONE]` and closes the connection, before the
    chunked body's end: the answer was whole, so it counts as answered, with its usage."""
    client, engine, rt = await front()
    resp = await client.post("/v1/completions", json={**BODY, "stream": True, "hold_end": True})
    assert resp.status == 200
    seen = b""
    while b"data: [DONE]" not in seen:
        seen += await resp.content.readany()
    resp.close()  # the engine holds the body's end until the request is counted
    await eventually(lambda: sample(rt, "swapper_request_duration_seconds_count", model="tiny") == 1)
    engine.end_released.set()
    assert sample(rt, "swapper_requests_total", model="tiny", code="200") == 1
    assert sample(rt, "swapper_completion_tokens_total", model="tiny") == 3


async def test_a_client_that_closes_as_soon_as_it_has_the_whole_answer_is_counted_as_answered(front, monkeypatch):
    """The last bytes reach the client before the handler runs again; a client that closes at
    once cancels the handler with the answer already complete (here the cancellation is made to
    land in exactly that window)."""
    attach, finish = Exchange.attach, Exchange._finish

    def attach_recording(self, raw, payload):  # noqa: ANN001, ANN202
        self.handler_task = asyncio.current_task()
        attach(self, raw, payload)

    def finish_then_client_leaves(self):  # noqa: ANN001, ANN202
        finish(self)
        task = getattr(self, "handler_task", None)
        if task is not None and asyncio.current_task() is None:  # the last bytes came in a callback
            task.cancel()

    monkeypatch.setattr(Exchange, "attach", attach_recording)
    monkeypatch.setattr(Exchange, "_finish", finish_then_client_leaves)
    client, _, rt = await front()
    for body in ({**BODY, "big": 1 << 20}, {**BODY, "stream": True}):  # several reads each
        r = await client.post("/v1/completions", json=body)
        assert r.status == 200
        await r.read()
    # each is counted as its handler returns
    await eventually(lambda: sample(rt, "swapper_request_duration_seconds_count", model="tiny") == 2)
    assert sample(rt, "swapper_requests_total", model="tiny", code="200") == 2
    assert sample(rt, "swapper_requests_total", model="tiny", code="499") == 0
    assert sample(rt, "swapper_completion_tokens_total", model="tiny") == 1 + 3, "usage counted for both"
