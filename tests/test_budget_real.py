"""The memory budget with real llama-server children on this machine (host probe, psutil)."""

from __future__ import annotations

import concurrent.futures as cf
import random
import threading
import time

import psutil
import pytest

from conftest import link, synth_file

pytestmark = pytest.mark.real

MiB = 1 << 20
SIZE_MIB = 200  # three distinct synthetic models; the budget holds two of them


@pytest.fixture
def three_models(tmp_path):
    d = tmp_path / "budget-models"
    for i, name in enumerate(("m1", "m2", "m3")):
        link(synth_file(SIZE_MIB, 10 + i), d / f"{name}.gguf")
    return d


def tree_bytes(root_pid: int) -> int:
    """PSS of everything swapper started (keepers and engines)."""
    total = 0
    try:
        kids = psutil.Process(root_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    for p in kids:
        try:
            total += p.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return total


class Sampler(threading.Thread):
    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid = pid
        self.peak = 0
        self.samples = 0
        self.stop_flag = threading.Event()

    def run(self) -> None:
        while not self.stop_flag.is_set():
            self.peak = max(self.peak, tree_bytes(self.pid))
            self.samples += 1
            time.sleep(0.02)


def statuses(s) -> dict[str, str]:
    return {m["id"]: m["status"]["value"] for m in s.get("/models").json()["data"]}


def complete(s, model: str, tokens: int = 4):
    return s.post("/v1/completions", {"model": model, "prompt": "hello", "max_tokens": tokens, "temperature": 0})


def test_resident_set_never_exceeds_the_budget_under_a_random_workload(swapper_factory, three_models):
    budget = 650 * MiB
    s = swapper_factory("--models-dir", str(three_models), "--budget", str(budget), "--reserve", "0",
                        "--device", "cpu", "--queue-timeout", "120s", "--max-wait", "5s")
    sampler = Sampler(s.proc.pid)
    sampler.start()
    rng = random.Random(1234)
    sent = 0
    try:
        with cf.ThreadPoolExecutor(3) as pool:
            while sent < 60:
                group = [rng.choice(["m1", "m2", "m3"]) for _ in range(rng.choice([1, 1, 2, 3]))][: 60 - sent]
                replies = list(pool.map(lambda m: complete(s, m), group))
                assert [r.status for r in replies] == [200] * len(group), [r.text for r in replies]
                sent += len(group)
                assert sum(v == "loaded" for v in statuses(s).values()) <= 2
    finally:
        sampler.stop_flag.set()
        sampler.join()
    assert sampler.samples > 50
    assert sampler.peak <= budget, f"children used {sampler.peak / MiB:.0f} MiB > budget {budget / MiB:.0f} MiB"
    data = {m["id"]: m["status"] for m in s.get("/models").json()["data"]}
    for st in data.values():
        if st["value"] == "loaded":
            assert st["footprint_bytes"] and st["footprint_bytes"] > SIZE_MIB * MiB, "measured, not guessed"


def test_the_least_recently_used_idle_model_is_the_one_evicted(swapper_factory, three_models):
    s = swapper_factory("--models-dir", str(three_models), "--budget", "650MiB", "--reserve", "0", "--device", "cpu")
    for m in ("m1", "m2", "m1"):
        assert complete(s, m).status == 200
        time.sleep(0.05)
    assert complete(s, "m3").status == 200
    assert statuses(s) == {"m1": "loaded", "m2": "unloaded", "m3": "loaded"}
    events = s.get("/api/status").json()["events"]
    evictions = [e for e in events if e["action"] == "evict"]
    assert [(e["model"], e["reason"]) for e in evictions] == [("m2", "budget")]


def test_a_model_streaming_a_long_answer_is_not_stopped_under_it(swapper_factory, three_models, openai_client):
    s = swapper_factory("--models-dir", str(three_models), "--budget", "350MiB", "--reserve", "0", "--device", "cpu",
                        "--max-wait", "1s")
    client = openai_client(s)
    chunks: list[str] = []
    finish: list[str] = []
    usage: list[int] = []

    def stream() -> None:
        for c in client.completions.create(model="m1", prompt="go", max_tokens=400, stream=True,
                                           stream_options={"include_usage": True}, extra_body={"ignore_eos": True}):
            if c.usage:
                usage.append(c.usage.completion_tokens)
            if c.choices:
                chunks.append(c.choices[0].text)
                if c.choices[0].finish_reason:
                    finish.append(c.choices[0].finish_reason)

    t = threading.Thread(target=stream)
    t.start()
    s.wait_for(lambda: len(chunks) > 5, 60, "the stream to start")
    t0 = time.monotonic()
    other = complete(s, "m2")  # does not fit beside m1: must wait for the stream, even after max-wait
    waited = time.monotonic() - t0
    t.join(120)
    assert other.status == 200
    assert finish == ["length"] and usage == [400], "the stream ran to its end"
    assert waited > 1.0
    events = [e["action"] + ":" + e["model"] for e in s.get("/api/status").json()["events"]][::-1]
    assert events.index("evict:m1") > 0 and statuses(s)["m2"] == "loaded"


def test_queue_full_and_queue_timeout_answers(swapper_factory, three_models, openai_client):
    s = swapper_factory("--models-dir", str(three_models), "--budget", "350MiB", "--reserve", "0", "--device", "cpu",
                        "--queue-size", "2", "--queue-timeout", "2s", "--max-wait", "60s")
    client = openai_client(s)
    done = threading.Event()

    def hold() -> None:
        for _ in client.completions.create(model="m1", prompt="go", max_tokens=600, stream=True,
                                           extra_body={"ignore_eos": True}):
            pass
        done.set()

    t = threading.Thread(target=hold)
    t.start()
    s.wait_for(lambda: s.status("m1")["inflight"] == 1, 60, "m1 to be busy")
    with cf.ThreadPoolExecutor(3) as pool:
        waiting = [pool.submit(complete, s, "m2") for _ in range(2)]
        s.wait_for(lambda: s.status("m2")["queued"] == 2, 10, "two queued")
        full = complete(s, "m2")
        assert full.status == 503 and full.error_code() == "queue_full"
        assert int(full.headers["retry-after"]) >= 1
        timed_out = [f.result() for f in waiting]
    assert [r.status for r in timed_out] == [504, 504]
    assert timed_out[0].error_code() == "queue_timeout"
    t.join(120)
    assert done.is_set()


def test_a_model_larger_than_the_budget_is_refused_with_the_numbers(swapper_factory, three_models):
    link(synth_file(8, 1), three_models / "small.gguf")  # (a budget too small for every model stops at start)
    s = swapper_factory("--models-dir", str(three_models), "--budget", "150MiB", "--reserve", "0", "--device", "cpu")
    r = complete(s, "m1")
    assert r.status == 503 and r.error_code() == "insufficient_memory"
    assert "MiB" in r.json()["error"]["message"]
    assert s.engine_pids() == []
