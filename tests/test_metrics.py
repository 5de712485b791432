"""`/metrics` of a real swapper over real llama-server children, read with prometheus_client's parser.

Also the swap log: every swap is logged exactly once, in text and in JSON, with model, reason,
bytes and seconds.
"""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.real


@dataclass
class Scrape:
    """One parsed exposition: samples by name, each with its labels."""

    text: str

    def __post_init__(self) -> None:
        self.samples = [(s.name, s.labels, s.value) for fam in text_string_to_metric_families(self.text)
                        for s in fam.samples]

    def value(self, name: str, **labels: str) -> float:
        """Sum of the samples called `name` whose labels include `labels` (0 when none)."""
        return sum(v for n, lab, v in self.samples if n == name and labels.items() <= lab.items())

    def has(self, name: str, **labels: str) -> bool:
        return any(n == name and labels.items() <= lab.items() for n, lab, _ in self.samples)

    def label_values(self, label: str) -> set[str]:
        return {lab[label] for _, lab, _ in self.samples if label in lab}


def scrape(s, path: str = "/metrics", **kw) -> Scrape:  # noqa: ANN001
    r = s.get(path, **kw)
    assert r.status == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    return Scrape(r.text)


def test_requests_tokens_swaps_and_gauges_move(swapper_factory, models_dir, openai_client):
    s = swapper_factory("--models-dir", str(models_dir), "--max-models", "1")
    client = openai_client(s)
    before = scrape(s)
    assert before.value("swapper_requests_total") == 0
    assert before.value("swapper_resident_models") == 0
    assert before.value("swapper_capacity_bytes") > 0
    assert before.value("swapper_queue_depth", model="tiny-a") == 0

    out = client.completions.create(model="tiny-a", prompt="hello", max_tokens=5, temperature=0,
                                    extra_body={"ignore_eos": True})
    chunks = list(client.chat.completions.create(
        model="tiny-a", messages=[{"role": "user", "content": "hi"}], max_tokens=7, stream=True, temperature=0,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    usage = next(c.usage for c in reversed(chunks) if c.usage)
    # a request is counted when its handler returns, a moment after the client read the last byte
    s.wait_for(lambda: scrape(s).value("swapper_request_duration_seconds_count", model="tiny-a") == 2, 10,
               "both requests to be counted")
    m = scrape(s)
    assert m.value("swapper_requests_total", model="tiny-a", code="200") == 2, \
        [line for line in m.text.splitlines() if line.startswith("swapper_requests_total")]
    assert m.value("swapper_request_duration_seconds_count", model="tiny-a") == 2
    assert m.value("swapper_time_to_first_byte_seconds_count", model="tiny-a") == 2
    assert m.value("swapper_queue_wait_seconds_count", model="tiny-a") == 2
    # the first request waited for the cold load; the histogram saw that wait
    assert m.value("swapper_queue_wait_seconds_sum", model="tiny-a") > 0
    assert m.value("swapper_prompt_tokens_total", model="tiny-a") == out.usage.prompt_tokens + usage.prompt_tokens
    assert m.value("swapper_completion_tokens_total", model="tiny-a") == \
        out.usage.completion_tokens + usage.completion_tokens == 12
    assert m.value("swapper_swaps_total", model="tiny-a", action="load", reason="demand") == 1
    assert m.value("swapper_load_duration_seconds_count", model="tiny-a") == 1
    assert m.value("swapper_load_duration_seconds_sum", model="tiny-a") > 0
    assert m.value("swapper_resident_models") == 1
    assert m.value("swapper_model_state", model="tiny-a", state="ready") == 1
    footprint = m.value("swapper_model_footprint_bytes", model="tiny-a")
    assert footprint > 0
    assert m.value("swapper_ledger_used_bytes") == footprint
    assert m.value("swapper_probe_used_bytes") > 0 and m.value("swapper_probe_total_bytes") > 0

    # one slot: tiny-b evicts tiny-a, counted as an eviction for the budget
    client.completions.create(model="tiny-b", prompt="x", max_tokens=1)
    m = scrape(s)
    assert m.value("swapper_swaps_total", model="tiny-a", action="evict", reason="budget") == 1
    assert m.value("swapper_swaps_total", model="tiny-b", action="load", reason="demand") == 1
    assert m.value("swapper_model_state", model="tiny-a", state="unloaded") == 1
    assert m.value("swapper_resident_models") == 1

    # made-up names never become label values
    for name in ("no-such-model", "../../etc/passwd"):
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model=name, prompt="x", max_tokens=1)
    s.post("/v1/completions", raw=b"{broken", headers={"Content-Type": "application/json"})
    s.wait_for(lambda: scrape(s).value("swapper_requests_total", model="unknown", code="400") == 1, 10,
               "the bad requests to be counted")
    m = scrape(s)
    assert m.value("swapper_requests_total", model="unknown", code="404") == 2
    assert m.value("swapper_requests_total", model="unknown", code="400") == 1
    assert m.label_values("model") <= {"gemma", "tiny-a", "tiny-b", "unknown"}
    assert "no-such-model" not in m.text and "passwd" not in m.text


def test_queue_gauges_count_requests_waiting_on_a_cold_swap(swapper_factory, models_dir, openai_client):
    """tiny-a is unloaded and cannot load while gemma streams (one slot): its requests queue."""
    s = swapper_factory("--models-dir", str(models_dir), "--max-models", "1", "--preload", "gemma")
    s.wait_for(lambda: s.status("gemma")["value"] == "loaded", 60, "preload")
    client = openai_client(s)
    stream = client.chat.completions.create(
        model="gemma", messages=[{"role": "user", "content": "Write a long story."}], max_tokens=2000,
        stream=True, temperature=0, extra_body={"ignore_eos": True})
    next(iter(stream))
    results: list[str] = []

    def cold(i: int) -> None:
        r = client.completions.create(model="tiny-a", prompt=f"{i}", max_tokens=2)
        results.append(r.choices[0].finish_reason)

    threads = [threading.Thread(target=cold, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    s.wait_for(lambda: scrape(s).value("swapper_queue_depth", model="tiny-a") == 3, 20, "three waiters")
    queued_at = time.monotonic()  # all three are waiting from here on, at the latest
    m = scrape(s)
    assert m.value("swapper_queued_requests") == 3, "the node-wide gauge includes cold-swap waiters"
    assert m.value("swapper_running_requests") == 1
    assert m.value("swapper_inflight_requests", model="gemma") == 1
    assert m.value("swapper_model_state", model="tiny-a", state="unloaded") == 1
    held = time.monotonic() - queued_at
    stream.close()  # gemma goes idle, is evicted, and tiny-a serves its queue
    for t in threads:
        t.join(60)
    assert results == ["length"] * 3
    m = scrape(s)
    assert m.value("swapper_queued_requests") == 0
    assert m.value("swapper_queue_depth", model="tiny-a") == 0
    s.wait_for(lambda: scrape(s).value("swapper_queue_wait_seconds_count", model="tiny-a") == 3, 10, "3 waits")
    m = scrape(s)
    assert m.value("swapper_queue_wait_seconds_sum", model="tiny-a") >= 3 * held > 0, "each waited at least that"
    assert m.value("swapper_swaps_total", model="gemma", action="evict", reason="budget") == 1


def test_child_metrics_under_model_query(swapper_factory, models_dir, openai_client):
    s = swapper_factory("--models-dir", str(models_dir))
    r = s.get("/metrics?model=tiny-a")
    assert r.status == 503 and r.error_code() == "model_not_loaded", "scraping never loads a model"
    assert s.status("tiny-a")["value"] == "unloaded"
    out = openai_client(s).completions.create(model="tiny-a", prompt="abc", max_tokens=9, temperature=0,
                                              extra_body={"ignore_eos": True})
    child = scrape(s, "/metrics?model=tiny-a")
    assert child.value("llamacpp:tokens_predicted_total") == out.usage.completion_tokens == 9
    assert not child.has("swapper_requests_total"), "the child's own exposition, not swapper's"
    r = s.get("/metrics?model=../../etc/passwd")
    assert r.status == 404 and r.error_code() == "model_not_found"


def _load_and_evict(s, client) -> None:  # noqa: ANN001
    client.completions.create(model="tiny-a", prompt="x", max_tokens=1)
    client.completions.create(model="tiny-b", prompt="x", max_tokens=1)
    assert s.post("/models/unload?wait=1", {"model": "tiny-b"}).status == 200


def test_every_swap_is_logged_once_as_text(swapper_factory, models_dir, openai_client):
    s = swapper_factory("--models-dir", str(models_dir), "--max-models", "1")
    _load_and_evict(s, openai_client(s))
    s.wait_for(lambda: s.log().count(" swap ") >= 4, 10, "four swap lines")  # log lines leave in batches
    lines = [ln for ln in s.log().splitlines() if " swap " in ln]
    pat = re.compile(r" swap (\w+) model=(\S+) reason=(\w+) bytes=(\d+) seconds=(\d+\.\d{3})")
    swaps = [pat.search(ln) for ln in lines]
    assert all(swaps), lines
    got = [(m[1], m[2], m[3]) for m in swaps]
    assert got == [("load", "tiny-a", "demand"), ("evict", "tiny-a", "budget"),
                   ("load", "tiny-b", "demand"), ("unload", "tiny-b", "manual")]
    assert all(int(m[4]) > 0 for m in swaps), "each swap names the bytes it moved"
    assert float(swaps[0][5]) > 0


def test_every_swap_is_logged_once_as_json(swapper_factory, models_dir, openai_client):
    s = swapper_factory("--models-dir", str(models_dir), "--max-models", "1", "--log-format", "json")
    _load_and_evict(s, openai_client(s))
    s.stop()
    records = [json.loads(ln) for ln in s.log().splitlines() if ln.strip()]  # every line is JSON
    assert {"time", "level", "logger", "message"} <= set(records[0])
    swaps = [r["swap"] for r in records if "swap" in r]
    got = [(w["action"], w["model"], w["reason"]) for w in swaps]
    assert got == [("load", "tiny-a", "demand"), ("evict", "tiny-a", "budget"),
                   ("load", "tiny-b", "demand"), ("unload", "tiny-b", "manual")]
    assert all(w["bytes"] > 0 and isinstance(w["seconds"], float) for w in swaps)
    access = [r for r in records if r["logger"] == "swapper.access"]
    assert access and all(re.fullmatch(r"[0-9a-f]{32}", r["request_id"]) for r in access)
