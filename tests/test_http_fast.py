"""The HTTP layer in process: routing, errors, streaming, crash recovery — no child processes.

The real app (proxy, API, metrics, middlewares, scheduler) runs on swapper's own port (front.py,
with aiohttp behind it) and on aiohttp's test server alone; the children are small aiohttp apps
in this process (httpfakes.py).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from httpfakes import JsonErrorTestServer, OwnFrontTestServer, app_for, runtime
from swapper.config import ConfigError


@pytest.fixture(params=["own", "aiohttp"])
async def served(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Any]:
    """The app on swapper's own port (front.py first, as `serve` runs it) and on aiohttp alone."""
    made: list[TestClient] = []

    async def make(**kw: Any) -> tuple[TestClient, Any, Any]:
        rt, launcher = runtime(tmp_path / f"rt{len(made)}", **kw)
        server = OwnFrontTestServer(rt) if request.param == "own" else JsonErrorTestServer(app_for(rt))
        client = TestClient(server)
        await client.start_server()
        made.append(client)
        return client, rt, launcher

    yield make
    for c in made:
        await c.close()


def chat(model: str = "a", **kw: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **kw}


async def error_of(resp: Any) -> dict[str, Any]:
    assert resp.content_type == "application/json", await resp.text()
    err = (await resp.json())["error"]
    assert set(err) >= {"message", "type", "param", "code"}
    return err


async def metrics_show(client: TestClient, line: str, timeout: float = 10.0) -> bool:
    """Metrics are counted as a handler ends, a moment after the client has its answer: poll."""
    end = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < end:
        if line in await (await client.get("/metrics")).text():
            return True
        await asyncio.sleep(0.02)
    return False


async def raw_exchange(client: TestClient, data: bytes) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(data)
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


# ------------------------------------------------------------------------------ routing


async def test_a_request_is_routed_to_its_model_loaded_on_demand(served):
    client, rt, launcher = await served()
    r = await client.post("/v1/chat/completions", json=chat("a"))
    assert r.status == 200 and (await r.json())["model"] == "a"
    r = await client.post("/v1/chat/completions", json=chat("b"))
    assert (await r.json())["model"] == "b"
    assert launcher.starts == ["a", "b"]
    models = {m["id"]: m["status"]["value"] for m in (await (await client.get("/models")).json())["data"]}
    assert models == {"a": "loaded", "b": "loaded"}


async def test_unknown_and_missing_models_get_json_errors(served):
    client, _, _ = await served()
    r = await client.post("/v1/chat/completions", json=chat("nope"))
    assert r.status == 404 and (await error_of(r))["code"] == "model_not_found"
    r = await client.post("/v1/chat/completions", json={"messages": []})
    assert r.status == 400 and (await error_of(r))["code"] == "invalid_request"


async def test_a_stream_passes_through_chunk_by_chunk(served):
    client, _, _ = await served()
    r = await client.post("/v1/chat/completions", json=chat("a", stream=True, max_tokens=5))
    assert r.status == 200
    text = (await r.read()).decode()
    assert [line for line in text.split("\n") if line.startswith("data: {")].__len__() == 5
    assert text.rstrip().endswith("data: [DONE]")


async def test_metrics_count_requests_by_model_and_status(served):
    client, _, _ = await served()
    await client.post("/v1/chat/completions", json=chat("a"))
    assert await metrics_show(client, 'swapper_requests_total{code="200",model="a"} 1.0')


# ------------------------------------------------------------------------------ bad input


async def test_json_nested_100000_deep_is_a_400_not_a_crash(served):
    client, _, _ = await served()
    deep = b'{"model": "a", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    for path in ("/v1/chat/completions", "/models/load"):
        r = await client.post(path, data=deep, headers={"Content-Type": "application/json"})
        assert r.status == 400, path
        assert (await error_of(r))["code"] == "invalid_request"


async def test_a_64kib_header_gets_431_in_the_json_shape(served):
    client, _, _ = await served()
    req = (b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (64 << 10) + b"\r\n\r\n")
    status, headers, body = await raw_exchange(client, req)
    assert status == 431
    assert headers["content-type"].startswith("application/json")
    assert json.loads(body)["error"]["code"] == "headers_too_large"


async def test_a_malformed_request_line_gets_400_in_the_json_shape(served):
    client, _, _ = await served()
    status, headers, body = await raw_exchange(client, b"GARBAGE\r\n\r\n")
    assert status == 400
    assert json.loads(body)["error"]["code"] == "invalid_request"


# ------------------------------------------------------------------------------ crashes


async def test_a_request_granted_to_a_child_that_just_died_waits_for_the_reload(served):
    client, rt, launcher = await served()
    assert (await client.post("/v1/chat/completions", json=chat("a"))).status == 200
    await launcher.children["a"].crash(known_after=0.2)  # the port refuses before the exit is known
    replies = await asyncio.gather(*(client.post("/v1/chat/completions", json=chat("a")) for _ in range(5)))
    assert [r.status for r in replies] == [200] * 5, [await r.text() for r in replies]
    assert launcher.starts == ["a", "a"], "one reload for all of them"
    st = rt.scheduler.models["a"]
    assert not st.failed, "a crash is not a failed load"


async def test_a_child_dying_mid_stream_ends_that_stream_and_the_next_request_is_served(served):
    client, rt, launcher = await served()
    r = await client.post("/v1/chat/completions", json=chat("a", stream=True, max_tokens=50, hold=True))
    assert r.status == 200
    first = await r.content.readany()
    assert first.startswith(b"data: ")
    await launcher.children["a"].crash(known_after=0.01)
    with pytest.raises(aiohttp.ClientPayloadError):
        await r.read()  # the cut stream simply ends, incomplete (no [DONE], no error body)
    nxt = await client.post("/v1/chat/completions", json=chat("a"))
    assert nxt.status == 200
    assert await metrics_show(client, 'swapper_requests_total{code="502",model="a"} 1.0'), \
        "the cut stream counts as an error"


# ------------------------------------------------------------------------------ admin


async def test_admin_load_and_unload_answer_like_llama_cpp_router(served):
    client, rt, launcher = await served()
    r = await client.post("/models/load?wait=1", json={"model": "a"})
    assert r.status == 200 and (await r.json()) == {"success": True}
    r = await client.post("/models/load", json={"model": "a"})
    assert r.status == 400 and "already" in (await error_of(r))["message"]
    r = await client.post("/models/unload?wait=1", json={"model": "a"})
    assert r.status == 200
    r = await client.post("/models/unload", json={"model": "a"})
    assert r.status == 400 and "not running" in (await error_of(r))["message"]


async def test_a_failing_reload_answers_the_error_and_keeps_the_old_settings(served, tmp_path):
    def broken() -> Any:
        raise ConfigError("config.yaml", "models.a.ctx_size", "not a number: 'lots'")

    client, rt, _ = await served(reload_settings=broken)
    r = await client.get("/models?reload=1")
    assert r.status == 400
    assert "ctx_size" in (await error_of(r))["message"]
    assert sorted(rt.catalog.names()) == ["a", "b"]


# ------------------------------------------------------------------------------ start-up


def test_a_budget_that_holds_no_model_stops_at_start_with_one_line_and_exit_2(tmp_path):
    import subprocess
    import sys

    from httpfakes import make_models
    from swapper.process import free_port

    d = make_models(tmp_path / "models")
    p = subprocess.run([sys.executable, "-m", "swapper", "serve", "--models-dir", str(d), "--device", "cpu",
                        "--budget", "1KiB", "--port", str(free_port()), "--state-dir", str(tmp_path / "st")],
                       capture_output=True, text=True, timeout=60, env={"SWAPPER_HF_CACHE": "0", "PATH": "/usr/bin"})
    assert p.returncode == 2, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "capacity" in lines[0] and "--budget" in lines[0], p.stderr


def test_capacity_plans_with_the_budget_when_the_reserve_is_larger(tmp_path):
    from swapper.app import capacity_problem

    rt, _ = runtime(tmp_path, budget=450 << 20)
    rt.settings.reserve = 512 << 20
    assert rt.scheduler.capacity == 450 << 20
    assert capacity_problem(rt) is None
    rt0, _ = runtime(tmp_path / "zero", budget=0)
    assert "capacity of 0 bytes" in capacity_problem(rt0)


async def test_the_status_stream_stays_quiet_while_nothing_changes(served):
    client, rt, _ = await served()
    await client.post("/v1/chat/completions", json=chat("a"))
    r = await client.get("/api/events")
    first = await asyncio.wait_for(r.content.readuntil(b"\n\n"), 10)
    assert first.startswith(b"data: ")
    for _ in range(5):  # requests to a loaded model change nothing the page shows
        assert (await client.post("/v1/chat/completions", json=chat("a"))).status == 200
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(r.content.readuntil(b"\n\n"), 1.5)
    r.close()
