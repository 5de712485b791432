"""`swapper serve` over real llama-server children, called with the official openai client."""

from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import threading
import time

import openai
import pytest

from conftest import link, synth_file, wait_gone

pytestmark = pytest.mark.real


def test_chat_completion_streaming_and_on_demand_load(swapper_factory, models_dir, openai_client):
    s = swapper_factory("--models-dir", str(models_dir))
    client = openai_client(s)
    assert s.status("gemma")["value"] == "unloaded"
    assert s.engine_pids() == []

    chat = client.chat.completions.create(model="gemma", messages=[{"role": "user", "content": "Name a color."}],
                                          max_tokens=12, temperature=0)
    assert chat.model == "gemma"
    assert chat.choices[0].message.content.strip()
    assert chat.usage.completion_tokens > 0
    assert s.status("gemma")["value"] == "loaded"

    comp = client.completions.create(model="gemma", prompt="The capital of France is", max_tokens=8, temperature=0)
    assert comp.choices[0].text.strip()

    chunks = list(client.chat.completions.create(
        model="gemma", messages=[{"role": "user", "content": "Count to five."}], max_tokens=24, stream=True))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 3, "a streamed answer arrives in several chunks"
    assert len(s.engine_pids()) == 1, "one model, one llama-server"


def test_streamed_chunks_arrive_as_generated_not_buffered(swapper_factory, models_dir, openai_client):
    s = swapper_factory("--models-dir", str(models_dir), "--preload", "gemma")
    s.wait_for(lambda: s.status("gemma")["value"] == "loaded", 60, "preload")
    client = openai_client(s)
    stamps = []
    for c in client.chat.completions.create(model="gemma", messages=[{"role": "user", "content": "Tell a story."}],
                                            max_tokens=64, stream=True, temperature=0):
        if c.choices and c.choices[0].delta.content:
            stamps.append(time.monotonic())
    assert len(stamps) > 20
    # ~95 tokens/s here: a buffered proxy would deliver everything within a millisecond or two
    assert stamps[-1] - stamps[0] > 0.1, "chunks were delivered together, not streamed"


def test_embeddings_on_a_model_started_with_embeddings(swapper_factory, tmp_path, gemma_file, openai_client):
    d = tmp_path / "emb-models"
    link(gemma_file, d / "gemma.gguf")
    cfg = {"models": {"embedder": {"path": str(gemma_file), "args": ["--embeddings", "--pooling", "mean"]}}}
    s = swapper_factory("--models-dir", str(d), config=cfg)
    client = openai_client(s)
    out = client.embeddings.create(model="embedder", input=["hello world", "goodbye"])
    assert len(out.data) == 2
    assert len(out.data[0].embedding) == 640  # Gemma 3 270M's hidden size
    assert out.data[0].embedding != out.data[1].embedding


def test_tokenize_routes_by_body_model(swapper_factory, models_dir):
    s = swapper_factory("--models-dir", str(models_dir))
    r = s.post("/tokenize", {"model": "tiny-a", "content": "hi"})
    assert r.status == 200, r.text
    # byte-level vocabulary: "hi" is two byte tokens (plus the SPM space marker's bytes)
    assert len(r.json()["tokens"]) >= 2
    r = s.post("/detokenize", {"model": "tiny-a", "tokens": r.json()["tokens"]})
    assert r.status == 200 and "hi" in r.json()["content"]


def test_max_models_one_swaps_between_two_models(swapper_factory, models_dir, openai_client):
    s = swapper_factory("--models-dir", str(models_dir), "--max-models", "1")
    client = openai_client(s)
    for model in ("tiny-a", "tiny-b", "tiny-a"):
        client.completions.create(model=model, prompt="x", max_tokens=2)
        statuses = {m: s.status(m)["value"] for m in ("tiny-a", "tiny-b")}
        other = "tiny-b" if model == "tiny-a" else "tiny-a"
        assert statuses == {model: "loaded", other: "unloaded"}
        assert len(s.engine_pids()) == 1


def test_five_concurrent_cold_requests_start_exactly_one_process(swapper_factory, models_dir, openai_client):
    s = swapper_factory("--models-dir", str(models_dir))
    client = openai_client(s)
    seen: set[int] = set()
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            seen.update(s.engine_pids())
            time.sleep(0.01)

    t = threading.Thread(target=watch)
    t.start()
    try:
        with cf.ThreadPoolExecutor(5) as pool:
            results = list(pool.map(lambda i: client.completions.create(model="gemma", prompt=f"{i}:", max_tokens=4),
                                    range(5)))
    finally:
        stop.set()
        t.join()
    assert len(results) == 5 and all(r.choices for r in results)
    assert len(seen) == 1, f"llama-server processes seen: {seen}"


def test_ready_only_after_a_model_is_loaded(swapper_factory, models_dir):
    s = swapper_factory("--models-dir", str(models_dir))
    r = s.get("/health/ready")
    assert r.status == 503 and "reason" in r.json()
    assert s.get("/health/live").status == 200
    s.post("/v1/completions", {"model": "tiny-a", "prompt": "x", "max_tokens": 1})
    assert s.get("/health/ready").status == 200


def test_preload_makes_the_node_ready_without_traffic(swapper_factory, models_dir):
    s = swapper_factory("--models-dir", str(models_dir), "--preload", "tiny-b")
    s.wait_for(lambda: s.get("/health/ready").status == 200, 60, "readiness")
    assert s.status("tiny-b")["value"] == "loaded"


def test_child_killed_while_idle_reloads_on_the_next_request_without_backoff(swapper_factory, models_dir,
                                                                              openai_client):
    s = swapper_factory("--models-dir", str(models_dir))
    client = openai_client(s)
    client.completions.create(model="tiny-a", prompt="x", max_tokens=1)
    (pid,) = s.engine_pids()
    os.kill(pid, signal.SIGKILL)
    s.wait_for(lambda: s.status("tiny-a")["value"] == "unloaded", 20, "the death to be noticed")
    st = s.status("tiny-a")
    assert st["failed"] is False and st["exit_code"] == 128 + signal.SIGKILL, "a crash is not a failed load"
    out = client.completions.create(model="tiny-a", prompt="x", max_tokens=1)  # at once: no back-off
    assert out.choices
    assert s.status("tiny-a")["value"] == "loaded"


def test_sigterm_lets_an_inflight_stream_finish(swapper_factory, models_dir, openai_client):
    s = swapper_factory("--models-dir", str(models_dir), "--preload", "gemma", "--drain-timeout", "60s")
    s.wait_for(lambda: s.status("gemma")["value"] == "loaded", 60, "preload")
    client = openai_client(s)
    stream = client.chat.completions.create(model="gemma", messages=[{"role": "user", "content": "Write a poem."}],
                                            max_tokens=400, stream=True, temperature=0,
                                            extra_body={"ignore_eos": True})
    received = 0
    finish = None
    for chunk in stream:
        if received == 3:  # long enough an answer that it is still generating after the late request
            s.proc.send_signal(signal.SIGTERM)
            # a request sent before the signal is handled would be served (after this stream,
            # on the one slot): the late one is sent once the shutdown has begun
            s.wait_for(lambda: s.get("/health").status == 503, 20, "the shutdown to begin")
            late = s.post("/v1/completions", {"model": "gemma", "prompt": "x", "max_tokens": 1})
            assert late.status == 503 and late.error_code() == "shutting_down"
        if chunk.choices and chunk.choices[0].delta.content:
            received += 1
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
    assert finish == "length" and received >= 300
    assert s.proc.wait(30) == 0
    assert s.engine_pids() == []


def test_supervisor_sigkill_leaves_no_llama_server_behind(swapper_factory, models_dir, openai_client):
    s = swapper_factory("--models-dir", str(models_dir))
    client = openai_client(s)
    client.completions.create(model="tiny-a", prompt="x", max_tokens=1)
    client.completions.create(model="tiny-b", prompt="x", max_tokens=1)
    pids = s.engine_pids() + s.child_pids()
    assert len(s.engine_pids()) == 2
    s.proc.kill()
    s.proc.wait(10)
    assert wait_gone(pids, 15) == []


def test_client_disconnect_cancels_the_upstream_generation(swapper_factory, models_dir):
    import http.client
    import json

    s = swapper_factory("--models-dir", str(models_dir), "--preload", "gemma")
    s.wait_for(lambda: s.status("gemma")["value"] == "loaded", 60, "preload")
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
    body = json.dumps({"model": "gemma", "messages": [{"role": "user", "content": "Write a long essay."}],
                       "max_tokens": 2000, "stream": True, "ignore_eos": True})
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    resp.read(200)
    conn.close()  # the client goes away mid-stream
    # llama-server logs the cancelled task; the slot is freed long before 2000 tokens (~20 s here)
    s.wait_for(lambda: s.status("gemma")["inflight"] == 0, 10, "the request to be released")
    t0 = time.monotonic()
    s.wait_for(lambda: not any(sl.get("is_processing") for sl in s.get("/slots?model=gemma").json()), 8,
               "llama-server to stop generating")
    assert time.monotonic() - t0 < 8


def test_unknown_model_is_404_listing_known_models(swapper_factory, models_dir, openai_client):
    s = swapper_factory("--models-dir", str(models_dir))
    with pytest.raises(openai.NotFoundError) as e:
        openai_client(s).chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    err = e.value.body
    assert err["code"] == "model_not_found"
    assert "gemma" in err["message"] and "tiny-a" in err["message"]


def test_bad_requests_get_openai_style_errors(swapper_factory, models_dir):
    s = swapper_factory("--models-dir", str(models_dir), "--max-body", "1KiB")
    r = s.post("/v1/chat/completions", raw=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status == 400 and r.error_code() == "invalid_request"
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = s.post("/v1/chat/completions", {"messages": []})
    assert r.status == 400 and r.json()["error"]["param"] == "model"
    r = s.post("/v1/chat/completions", {"model": "tiny-a", "messages": [{"role": "user", "content": "x" * 5000}]})
    assert r.status == 413 and r.error_code() == "request_too_large"
    r = s.post("/v1/chat/completions", raw=b"[1, 2]", headers={"Content-Type": "application/json"})
    assert r.status == 400
    assert s.get("/health/live").status == 200, "bad input never takes the supervisor down"


def test_a_model_that_fails_to_load_answers_503_with_its_log(swapper_factory, tmp_path, models_dir):
    bad = models_dir / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    s = swapper_factory("--models-dir", str(models_dir))
    r = s.post("/v1/completions", {"model": "broken", "prompt": "x"})
    assert r.status == 503 and r.error_code() == "model_load_failed"
    assert "retry-after" in r.headers
    assert "last log lines" in r.json()["error"]["message"]
    st = s.status("broken")
    assert st["value"] == "unloaded" and st["failed"] is True and st["exit_code"] not in (None, 0)
    ok = s.post("/v1/completions", {"model": "tiny-a", "prompt": "x", "max_tokens": 1})
    assert ok.status == 200, "other models are unaffected"


def test_split_and_mmproj_folders_are_served(swapper_factory, tmp_path):
    d = tmp_path / "m"
    link(synth_file(8, 3), d / "solo" / "model-q4.gguf")
    (d / "solo" / "mmproj-model-f16.gguf").write_bytes(b"")  # listed as companion, not a model
    s = swapper_factory("--models-dir", str(d))
    ids = [m["id"] for m in s.get("/v1/models").json()["data"]]
    assert ids == ["solo"]
