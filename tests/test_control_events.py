"""The control page's server side in-process: changes only, admin-guarded pin, failed-load logs.

A real app (routes, middlewares, scheduler) over the fake launcher and probe, so the event
stream's content is checked deterministically; the page itself runs in Chromium in
test_control_page.py.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from schedfakes import FakeLauncher
from swapper import process
from swapper.activity import ChildLogs
from swapper.app import build_runtime, create_app
from swapper.settings_load import load_settings
from swapper.gpu import FakeProbe
from swapper.synth import write_model

MiB = 1 << 20
ADMIN = {"Authorization": "Bearer adm"}  # with any key set, the page's routes need one too


@pytest.fixture
async def client(tmp_path: Path):
    d = tmp_path / "models"
    for name in ("a", "b", "bad"):
        write_model(d / f"{name}.gguf", 1 * MiB, seed=1)
    st = load_settings(env={}, preset=None)
    st.models_dir, st.state_dir, st.admin_keys = str(d), str(tmp_path / "state"), ["adm"]
    probe = FakeProbe(total=4 << 30)
    launcher = FakeLauncher(probe, fail={"bad"})
    rt = build_runtime(st, probe=probe, launcher=launcher)
    c = TestClient(TestServer(create_app(rt)))
    await c.start_server()
    try:
        yield c, rt
    finally:
        await c.close()


class Events:
    """Reads one server-sent event stream."""

    def __init__(self, resp):  # noqa: ANN001
        self.resp = resp
        self.skipped: list[tuple[str, object]] = []  # events passed over while looking for a kind

    async def next(self, kind: str | None = None, timeout: float = 10.0) -> tuple[str, object]:
        for i, (k, d) in enumerate(self.skipped):
            if kind is None or k == kind:
                return self.skipped.pop(i)

        async def read() -> tuple[str, object]:
            while True:
                event, data = "", None
                while True:
                    raw = await self.resp.content.readline()
                    if not raw:
                        raise EOFError("the event stream ended")
                    line = raw.decode().rstrip("\n")
                    if line.startswith("event: "):
                        event = line[7:]
                    elif line.startswith("data: "):
                        data = json.loads(line[6:])
                    elif line == "" and event:
                        break
                if kind is None or event == kind:
                    return event, data
                self.skipped.append((event, data))

        return await asyncio.wait_for(read(), timeout)


async def test_the_stream_starts_with_a_snapshot_then_sends_only_changed_models(client):
    c, rt = client
    async with c.get("/api/control/events", headers=ADMIN) as resp:
        ev = Events(resp)
        kind, snap = await ev.next()
        assert kind == "snapshot"
        assert {m["id"] for m in snap["models"]} == {"a", "b", "bad"}
        assert (await c.get("/api/control/state")).status == 401
        assert snap["keys"] == {"api": False, "admin": True}
        r = await c.post("/models/load", json={"model": "a"}, headers=ADMIN)
        assert r.status == 200
        seen: set[str] = set()
        while True:
            _, change = await ev.next("models")
            seen |= {row["id"] for row in change["rows"]}
            if any(row["id"] == "a" and row["value"] == "loaded" for row in change["rows"]):
                break
        assert seen == {"a"}, "rows that did not change are not sent again"
        _, swap = await ev.next("swap")
        assert (swap["model"], swap["action"], swap["reason"]) == ("a", "load", "manual")
        _, mem = await ev.next("memory")
        assert [m["id"] for m in mem["devices"][0]["models"]] == ["a"]


async def test_pin_is_an_admin_route_and_reaches_the_scheduler(client):
    c, rt = client
    assert (await c.post("/models/pin", json={"model": "b", "pinned": True})).status == 401
    r = await c.post("/models/pin", json={"model": "b", "pinned": True}, headers=ADMIN)
    assert r.status == 200 and rt.scheduler.models["b"].pinned
    r = await c.post("/models/pin", json={"model": "nope"}, headers=ADMIN)
    assert r.status == 404 and (await r.json())["error"]["code"] == "model_not_found"
    r = await c.post("/models/pin", json={"model": "b", "pinned": "yes"}, headers=ADMIN)
    assert r.status == 400 and (await r.json())["error"]["param"] == "pinned"
    r = await c.post("/models/pin", json={"model": "b", "pinned": False}, headers=ADMIN)
    assert r.status == 200 and not rt.scheduler.models["b"].pinned


async def test_a_failed_load_leaves_its_reason_and_output_in_the_logs_route(client):
    c, rt = client
    r = await c.post("/models/load?wait=1", json={"model": "bad"}, headers=ADMIN)
    assert r.status == 503 and (await r.json())["error"]["code"] == "model_load_failed"
    doc = await (await c.get("/api/control/logs?model=bad", headers=ADMIN)).json()
    assert doc["failed"] is True and doc["exit_code"] == 1
    assert "boom" in doc["error"] and doc["load_tail"] == ["error: cannot load model"]
    assert (await c.get("/api/control/logs?model=zzz", headers=ADMIN)).status == 404


async def test_every_proxied_request_becomes_an_activity_row(client):
    c, rt = client
    async with c.get("/api/control/events", headers=ADMIN) as resp:
        ev = Events(resp)
        await ev.next("snapshot")
        r = await c.post("/v1/chat/completions", json={"model": "nope", "messages": []}, headers=ADMIN)
        assert r.status == 404
        _, row = await ev.next("request")
        assert (row["model"], row["route"], row["status"]) == ("unknown", "/v1/chat/completions", 404)
        assert row["duration"] >= 0 and row["ttft"] is None
    state = await (await c.get("/api/control/state", headers=ADMIN)).json()
    assert [r["status"] for r in state["requests"]] == [404]


async def test_child_output_reaches_the_logs_route_and_a_watching_page_line_by_line(client):
    c, rt = client
    hook = next(h for h in process.line_hooks if isinstance(getattr(h, "__self__", None), ChildLogs))
    hook("a", ["before any page"])
    async with c.get("/api/control/events", headers=ADMIN) as resp:
        ev = Events(resp)
        await ev.next("snapshot")
        hook("a", ["first line", "second line"])
        assert (await ev.next("mlog"))[1] == {"model": "a", "line": "first line"}
        assert (await ev.next("mlog"))[1] == {"model": "a", "line": "second line"}
    doc = await (await c.get("/api/control/logs?model=a", headers=ADMIN)).json()
    assert doc["lines"] == ["before any page", "first line", "second line"]
