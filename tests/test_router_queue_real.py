"""llama.cpp router's queue scenarios (test_router.py's `test_router_queue_*`, which lean on the
router's LLAMA_SERVER_DEBUG_FAKE_TIMING delay) with a real long generation keeping a model busy:
with one model slot, a busy model is never evicted under its request, a client that leaves the
queue costs nobody a slot, and waiters are served in arrival order."""

from __future__ import annotations

import threading
import time

import pytest

import requests_shim as rq

pytestmark = pytest.mark.real

LONG = {"model": "gemma", "prompt": "Once upon a time", "n_predict": 120, "ignore_eos": True,
        "temperature": 0, "cache_prompt": False}


class Bg(threading.Thread):
    """One request in a thread; keeps its reply (or error) and when it finished."""

    def __init__(self, fn):  # noqa: ANN001
        super().__init__(daemon=True)
        self.fn, self.reply, self.error, self.done_at = fn, None, None, 0.0

    def run(self) -> None:
        try:
            self.reply = self.fn()
        except Exception as e:  # noqa: BLE001
            self.error = e
        self.done_at = time.monotonic()

    def ok(self) -> dict:
        self.join(900)  # a loaded 2-core box generates about 1 token/s
        assert not self.is_alive() and self.error is None and self.reply.status == 200, (self.error, self.reply)
        return self.reply.json()


def busy_gemma(s):  # noqa: ANN001, ANN201
    """gemma loaded and generating 120 tokens; returns the generation's thread once it is in flight."""
    assert s.post("/models/load?wait=1", {"model": "gemma"}).status == 200
    gen = Bg(lambda: rq.post(s.url + "/completion", LONG, timeout=900))
    gen.start()
    s.wait_for(lambda: s.status("gemma")["inflight"] == 1, 30, "gemma to be busy")
    return gen


def tokenize(s, model: str, timeout: float = 900):  # noqa: ANN001, ANN201
    return rq.post(s.url + "/tokenize", {"model": model, "content": "hello world"}, timeout=timeout)


def test_a_busy_model_is_not_evicted_and_the_queued_request_is_served_after(swapper_factory, models_dir):
    s = swapper_factory("--models-dir", str(models_dir), "--models-max", "1")
    gen = busy_gemma(s)
    queued = Bg(lambda: tokenize(s, "tiny-a"))
    queued.start()
    s.wait_for(lambda: s.status("tiny-a")["queued"] == 1, 30, "the request to queue")
    assert gen.is_alive(), "queued while gemma generates"
    out = gen.ok()
    assert out["tokens_predicted"] == 120, "the busy model finished its whole generation"
    queued.ok()
    assert gen.done_at < queued.done_at, "the queued request waited for the slot"
    assert s.status("tiny-a")["value"] == "loaded" and s.status("gemma")["value"] == "unloaded"


def test_a_client_that_leaves_the_queue_costs_no_slot(swapper_factory, models_dir):
    s = swapper_factory("--models-dir", str(models_dir), "--models-max", "1")
    gen = busy_gemma(s)
    with pytest.raises(OSError):  # gives up long before gemma is idle
        tokenize(s, "tiny-b", timeout=1)
    gen.ok()
    end = time.monotonic() + 3
    while time.monotonic() < end:  # nobody waits any more: gemma keeps its slot
        assert s.status("gemma")["value"] == "loaded" and s.status("tiny-b")["value"] == "unloaded"
        time.sleep(0.2)


def test_waiters_are_served_in_arrival_order(swapper_factory, models_dir):
    s = swapper_factory("--models-dir", str(models_dir), "--models-max", "1")
    gen = busy_gemma(s)
    first = Bg(lambda: tokenize(s, "tiny-a"))
    first.start()
    s.wait_for(lambda: s.status("tiny-a")["queued"] == 1, 30, "the first waiter to queue")
    assert gen.is_alive(), "queued while gemma generates"
    second = Bg(lambda: tokenize(s, "tiny-b"))
    second.start()
    gen.ok()
    first.ok()
    second.ok()
    assert gen.done_at < first.done_at < second.done_at
