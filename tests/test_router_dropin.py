"""swapper as a drop-in for llama.cpp's router, against a real swapper and llama-server:
autoload off (`--no-models-autoload`, `?autoload=`), `/health` while nothing is loaded, `/props`,
`status.args` / `status.preset`, and the cache's model management (`POST /models` downloading
through a Hub endpoint on 127.0.0.1 with progress on `/models/sse`, `DELETE /models`)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import requests

import requests_shim as rq
from conftest import link, synth_file
from llamacpp_router.fake_hub import FakeHub
from llamacpp_router.hub_cache import write_repo

pytestmark = pytest.mark.real

CHAT = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}


def test_autoload_off_answers_400_until_the_model_is_loaded(swapper_factory, models_dir):
    s = swapper_factory("--models-dir", str(models_dir), "--no-models-autoload")
    assert s.get("/health").status == 200, "/health is 200 while serving, with nothing loaded"
    assert s.get("/health/ready").status == 503, "readiness stays strict"
    props = s.get("/props").json()
    assert props["models_autoload"] is False and props["build_info"].startswith("b")

    r = s.post("/v1/chat/completions", {"model": "tiny-a", **CHAT})
    assert r.status == 400 and r.json()["error"]["message"] == "model is not loaded"
    assert r.error_code() == "model_not_loaded"
    assert s.status("tiny-a")["value"] == "unloaded", "refused without loading"

    r = s.post("/v1/chat/completions?autoload=true", {"model": "tiny-a", **CHAT})
    assert r.status == 200, "?autoload=true loads it for this request"
    r = s.post("/v1/chat/completions", {"model": "tiny-a", **CHAT})
    assert r.status == 200, "a loaded model is served with autoload off"


def test_autoload_false_per_request(swapper_factory, models_dir):
    s = swapper_factory("--models-dir", str(models_dir), "--models-max", "2")
    r = s.post("/tokenize?autoload=false", {"model": "tiny-b", "content": "hi"})
    assert r.status == 400 and "not loaded" in r.text
    assert s.post("/tokenize", {"model": "tiny-b", "content": "hi"}).status == 200
    assert s.get("/props").json()["max_instances"] == 2


def test_status_shows_the_childs_argv_and_its_preset(swapper_factory, tmp_path, models_dir):
    ini = tmp_path / "models.ini"
    ini.write_text(f"[*]\nctx-size = 1024\n\n[small]\nmodel = {models_dir / 'tiny-a.gguf'}\ntemp = 0.3\n")
    s = swapper_factory("--models-preset", str(ini), "--seed", "7")
    small = next(m for m in s.get("/models").json()["data"] if m["id"] == "small")
    assert small["source"] == "preset" and small["can_remove"] is False
    assert small["status"]["preset"] == (f"[small]\ntemperature = 0.3\nctx-size = 1024\n"
                                         f"model = {models_dir / 'tiny-a.gguf'}\n\n"), "llama.cpp's order: by first flag"
    s.post("/models/load?wait=1", {"model": "small"})
    args = s.status("small")["args"]
    assert args[0].endswith("llama-server") and "--seed" in args and "--temperature" in args
    assert args.index("--seed") < args.index("--temperature"), "router-wide flags first, the section's win"
    assert args[args.index("-c") + 1] == "1024"

    ini.write_text(f"[other]\nmodel = {models_dir / 'tiny-b.gguf'}\n")
    ids = {m["id"] for m in s.get("/models?reload=1").json()["data"]}
    assert "other" in ids and "small" not in ids, "?reload=1 re-reads the INI file"
    ini.write_text("[broken]\n  model = x\n")
    r = s.get("/models?reload=1")
    assert r.status == 400 and "line 2" in r.text, "a bad file is answered, and the old models stay"
    assert "other" in {m["id"] for m in s.get("/models").json()["data"]}


def _listen(url: str, events: list, ready: threading.Event, stop: threading.Event) -> None:
    try:
        with requests.get(url, stream=True, timeout=60) as resp:
            ready.set()
            for line in resp.iter_lines():
                if stop.is_set():
                    return
                if line.startswith(b"data: "):
                    events.append(json.loads(line[6:]))
    except requests.RequestException:
        pass  # the server went away at the end of the test


def _wait_event(events: list, event: str, model: str, timeout: float = 60) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for e in list(events):
            if e.get("event") == event and e.get("model") == model:
                return e
        time.sleep(0.05)
    raise AssertionError(f"no {event} for {model} in {events[-10:]}")


def test_download_into_the_cache_with_progress_then_delete(swapper_factory, tmp_path):
    cache = tmp_path / "hub"
    write_repo(cache, "org/kept-GGUF", {"kept-Q8_0.gguf": synth_file(8, 1)})
    name = "org/fresh-GGUF:F16"
    src = {"fresh-F16.gguf": synth_file(8, 2), "README.md": Path(__file__)}
    with FakeHub({"org/fresh-GGUF": src}) as hub:
        s = swapper_factory(env={"SWAPPER_HF_CACHE": "1", "LLAMA_CACHE": str(cache), "HF_ENDPOINT": hub.url,
                                 "HF_HUB_DISABLE_XET": "1"})
        listed = {m["id"]: m for m in s.get("/models").json()["data"]}
        assert set(listed) == {"org/kept-GGUF:Q8_0"} and listed["org/kept-GGUF:Q8_0"]["can_remove"] is True

        events: list = []
        ready, stop = threading.Event(), threading.Event()
        threading.Thread(target=_listen, args=(s.url + "/models/sse", events, ready, stop), daemon=True).start()
        assert ready.wait(10)
        r = s.post("/models", {"model": name})
        assert r.status == 200 and r.json() == {"success": True}, r.text
        _wait_event(events, "download_finished", name)
        progress = [e for e in events if e["event"] == "download_progress" and e["model"] == name]
        assert len(progress) >= 2, "progress is reported while the bytes arrive"
        (url, last), = progress[-1]["data"]["progress"].items()
        assert url.endswith("/org/fresh-GGUF/resolve/" + hub.commits["org/fresh-GGUF"] + "/fresh-F16.gguf")
        assert last["done"] == last["total"] == synth_file(8, 2).stat().st_size
        assert not any("README" in q for q in hub.requests), "only the model's files are fetched"
        assert (cache / "models--org--fresh-GGUF" / "refs" / "main").exists(), "huggingface-hub's cache layout"

        r = s.post("/models", {"model": name})
        assert r.status == 400 and "already exists" in r.text
        r = s.post("/models", {"model": "org/missing-GGUF:Q8_0"})
        assert r.status == 400 and "not found" in r.text

        assert s.post("/tokenize", {"model": name, "content": "hi"}).status == 200, "the download serves"
        _wait_event(events, "status_change", name)
        r = rq.request("DELETE", s.url + "/models?model=" + name)
        assert r.status == 200 and r.json() == {"success": True}, r.text
        _wait_event(events, "model_remove", name)
        stop.set()
        assert name not in {m["id"] for m in s.get("/models").json()["data"]}
        snap = cache / "models--org--fresh-GGUF" / "snapshots"
        assert not any(p.suffix == ".gguf" for p in snap.rglob("*")), "its files are gone from the cache"
        assert not any((cache / "models--org--fresh-GGUF" / "blobs").iterdir()), "and so are its blobs"
        assert rq.request("DELETE", s.url + "/models?model=" + name).status == 404


def test_only_cache_models_can_be_removed(swapper_factory, tmp_path):
    d = tmp_path / "models"
    link(synth_file(8, 1), d / "local.gguf")
    s = swapper_factory("--models-dir", str(d))
    r = rq.request("DELETE", s.url + "/models?model=local")
    assert r.status == 400 and "not removable" in r.text
    assert (d / "local.gguf").exists()
