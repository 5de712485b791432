"""The admin API as llama.cpp's router mode answers it, against a real swapper and llama-server.

`GET /models` (`?reload=1`, SIGHUP), `POST /models/load` / `/models/unload` with `{"model": NAME}`
-> `{"success": true}` (background by default, `?wait=1` blocks), `GET /running`, `GET /props`;
and names that look like paths never reach the disk.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from urllib.parse import quote

import pytest
import yaml

from conftest import link, synth_file
from test_metrics import scrape

pytestmark = pytest.mark.real


def test_load_and_unload_answer_like_the_llama_cpp_router(swapper_factory, models_dir):
    s = swapper_factory("--models-dir", str(models_dir))
    t0 = time.monotonic()
    r = s.post("/models/load", {"model": "gemma"})
    answered = time.monotonic() - t0
    assert r.status == 200 and r.json() == {"success": True}
    assert s.status("gemma")["value"] in ("loading", "loaded")
    s.wait_for(lambda: s.status("gemma")["value"] == "loaded", 60, "gemma to load")
    [load] = [e for e in s.get("/api/status").json()["events"] if e["action"] == "load"]
    assert answered < load["seconds"], "the answer came before the load ended: it goes on in the background"

    r = s.post("/models/load", {"model": "gemma"})
    assert r.status == 400 and r.error_code() == "invalid_request" and "already running" in r.text

    r = s.post("/models/load?wait=1", {"model": "tiny-a"})
    assert r.status == 200 and r.json() == {"success": True}
    assert s.status("tiny-a")["value"] == "loaded", "?wait=1 answers once the model is loaded"

    running = {m["id"]: m for m in s.get("/running").json()["data"]}
    assert set(running) == {"gemma", "tiny-a"}
    assert running["gemma"]["footprint_bytes"] > running["tiny-a"]["footprint_bytes"] > 0
    assert all(m["idle_seconds"] >= 0 and m["inflight"] == 0 for m in running.values())

    props = s.get("/props").json()
    assert props["role"] == "router" and props["models_autoload"] is True
    assert props["max_instances"] == 0 and props["budget_bytes"] > 0

    r = s.post("/models/unload", {"model": "tiny-a"})
    assert r.status == 200 and r.json() == {"success": True}
    s.wait_for(lambda: s.status("tiny-a")["value"] == "unloaded", 20, "tiny-a to unload")
    r = s.post("/models/unload", {"model": "tiny-a"})
    assert r.status == 400 and "not running" in r.text
    assert s.status("tiny-a")["failed"] is False

    for body, status, code in (({"model": "nope"}, 404, "model_not_found"), ({}, 400, "invalid_request"),
                               ({"model": 7}, 400, "invalid_request"), ([1], 400, "invalid_request")):
        for route in ("/models/load", "/models/unload"):
            r = s.post(route, body)
            assert (r.status, r.error_code()) == (status, code), (route, body, r.text)
    r = s.post("/models/load", raw=b"{oops", headers={"Content-Type": "application/json"})
    assert r.status == 400

    m = scrape(s)
    assert m.value("swapper_swaps_total", model="gemma", action="load", reason="manual") == 1
    assert m.value("swapper_swaps_total", model="tiny-a", action="unload", reason="manual") == 1
    assert s.get("/health/ready").status == 200


def test_manual_load_that_does_not_fit_evicts_like_a_demand_load(swapper_factory, models_dir, openai_client):
    s = swapper_factory("--models-dir", str(models_dir), "--max-models", "1")
    assert s.post("/models/load?wait=1", {"model": "tiny-a"}).status == 200
    assert s.post("/models/load?wait=1", {"model": "tiny-b"}).status == 200
    assert (s.status("tiny-a")["value"], s.status("tiny-b")["value"]) == ("unloaded", "loaded")
    assert len(s.engine_pids()) == 1
    m = scrape(s)
    assert m.value("swapper_swaps_total", model="tiny-a", action="evict", reason="budget") == 1
    assert m.value("swapper_swaps_total", model="tiny-b", action="load", reason="manual") == 1
    # and a request for the evicted model swaps it back the same way
    openai_client(s).completions.create(model="tiny-a", prompt="x", max_tokens=1)
    assert s.status("tiny-b")["value"] == "unloaded"


def test_load_refusals_are_answered_not_swallowed(swapper_factory, models_dir):
    (models_dir / "broken.gguf").write_bytes(b"GGUF" + b"\0" * 64)
    s = swapper_factory("--models-dir", str(models_dir), "--budget", "200MiB", "--reserve", "0")
    r = s.post("/models/load", {"model": "gemma"})
    assert r.status == 503 and r.error_code() == "insufficient_memory", "known before anything starts"
    assert s.status("gemma")["value"] == "unloaded"
    r = s.post("/models/load?wait=1", {"model": "broken"})
    assert r.status == 503 and r.error_code() == "model_load_failed" and "retry-after" in r.headers
    st = s.status("broken")
    assert st["failed"] is True and st["exit_code"] not in (None, 0)
    r = s.post("/models/load", {"model": "broken"})
    assert r.status == 503 and r.error_code() == "model_load_failed", "in back-off: refused at once"
    m = scrape(s)
    assert m.value("swapper_load_failures_total", model="broken") == 1
    assert m.value("swapper_swaps_total", model="broken") == 0


def test_unload_drains_inflight_requests_first(swapper_factory, models_dir, openai_client):
    s = swapper_factory("--models-dir", str(models_dir), "--preload", "gemma", "--drain-timeout", "300s")
    s.wait_for(lambda: s.status("gemma")["value"] == "loaded", 60, "preload")
    stream = openai_client(s).chat.completions.create(
        model="gemma", messages=[{"role": "user", "content": "Tell a story."}], max_tokens=40, stream=True,
        temperature=0, extra_body={"ignore_eos": True})
    tokens = 0
    finish = None
    for chunk in stream:
        if tokens == 3 and finish is None:
            r = s.post("/models/unload", {"model": "gemma"})
            assert r.status == 200
            st = s.status("gemma")
            assert (st["value"], st["state"], st["inflight"]) == ("loaded", "draining", 1)
        if chunk.choices and chunk.choices[0].delta.content:
            tokens += 1
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
    assert finish == "length" and tokens >= 36, "the stream was not cut"
    s.wait_for(lambda: s.status("gemma")["value"] == "unloaded", 20, "the drained model to stop")
    assert s.engine_pids() == []


def test_pinned_model_unloads_only_with_force(swapper_factory, models_dir):
    s = swapper_factory("--models-dir", str(models_dir), "--pin", "tiny-a")
    s.wait_for(lambda: s.status("tiny-a")["value"] == "loaded", 30, "the pinned model to load")
    assert s.status("tiny-a")["pinned"] is True
    r = s.post("/models/unload", {"model": "tiny-a"})
    assert r.status == 400 and r.json()["error"]["param"] == "force"
    assert s.status("tiny-a")["value"] == "loaded"
    r = s.post("/models/unload?wait=1", {"model": "tiny-a", "force": True})
    assert r.status == 200 and s.status("tiny-a")["value"] == "unloaded"


def _ids(s, query: str = "") -> set[str]:  # noqa: ANN001
    r = s.get("/models" + query)
    assert r.status == 200
    return {m["id"] for m in r.json()["data"]}


def test_reload_rescans_the_folder_and_rereads_the_config(swapper_factory, tmp_path, openai_client):
    d = tmp_path / "reload-models"
    link(synth_file(8, 1), d / "tiny-a.gguf")
    s = swapper_factory("--models-dir", str(d), config={"models": {}})
    config_path = Path(s.proc.args[s.proc.args.index("--config") + 1])
    assert _ids(s) == {"tiny-a"}

    link(synth_file(8, 2), d / "tiny-b.gguf")
    assert _ids(s) == {"tiny-a"}, "a plain listing does not rescan"
    assert _ids(s, "?reload=1") == {"tiny-a", "tiny-b"}

    config_path.write_text(yaml.safe_dump({"models": {"declared": {"path": str(synth_file(8, 3)),
                                                                   "aliases": ["decl"]}}}))
    link(synth_file(8, 3), d / "tiny-c.gguf")
    s.proc.send_signal(signal.SIGHUP)
    s.wait_for(lambda: _ids(s) == {"tiny-a", "tiny-b", "tiny-c", "declared"}, 20, "SIGHUP to reload")
    out = openai_client(s).completions.create(model="decl", prompt="x", max_tokens=1)
    assert out.choices and s.status("declared")["value"] == "loaded"

    (d / "tiny-b.gguf").unlink()
    assert _ids(s, "?reload=1") == {"tiny-a", "tiny-c", "declared"}


PATHS = ["../../etc/passwd", "/etc/passwd", "%2e%2e/%2e%2e/etc/passwd", "..%2f..%2fetc%2fpasswd",
         "....//....//etc/passwd", "tiny-a/../../../etc/passwd", "./tiny-a.gguf", "tiny-a.gguf"]


def test_names_are_names_never_paths(swapper_factory, models_dir, tmp_path):
    outside = link(synth_file(8, 3), tmp_path / "outside" / "secret.gguf")  # a valid model, elsewhere
    s = swapper_factory("--models-dir", str(models_dir))
    names = PATHS + [str(outside), str(models_dir / "tiny-a.gguf"), "file://" + str(outside)]
    for name in names:
        for route in ("/models/load?wait=1", "/models/unload?wait=1"):
            r = s.post(route, {"model": name})
            assert (r.status, r.error_code()) == (404, "model_not_found"), (route, name, r.text)
        r = s.post("/v1/chat/completions", {"model": name, "messages": [{"role": "user", "content": "x"}]})
        assert (r.status, r.error_code()) == (404, "model_not_found"), (name, r.text)
        r = s.post("/v1/completions", {"prompt": "x"}, headers={"X-Gateway-Model-Name": name})
        assert (r.status, r.error_code()) == (404, "model_not_found"), (name, r.text)
        for path in ("/props", "/slots", "/metrics"):
            r = s.get(f"{path}?model={quote(name, safe='')}")
            assert (r.status, r.error_code()) == (404, "model_not_found"), (path, name, r.text)
        assert "root:" not in r.text
    for raw_path in ("/models/load/../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd", "/static/../../etc/passwd"):
        r = s.get(raw_path)
        assert r.status == 404 and "root:" not in r.text, raw_path
    assert s.engine_pids() == [], "nothing was started"
    assert "loading model" not in s.log(), "no child ever opened a file"
    assert {m["id"] for m in s.get("/models").json()["data"]} == {"gemma", "tiny-a", "tiny-b"}
    assert json.dumps(s.get("/models").json()).count("secret.gguf") == 0
