"""The per-request metrics: plain numbers on the request path, the client library's exposition."""

from __future__ import annotations

import re

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from swapper.metrics import Metrics
from swapper.request_metrics import LATENCY, CounterSet, HistogramSet


def _lines(reg: CollectorRegistry) -> list[str]:
    """A registry's exposition, less its creation times (which differ between the two sides)."""
    text = generate_latest(reg).decode()
    return sorted(re.sub(r"(_created\{[^}]*\}) .*", r"\1 T", line) for line in text.splitlines())


def _ours(family: object) -> list[str]:
    reg = CollectorRegistry()
    reg.register(_Family(family))  # type: ignore[arg-type]
    return _lines(reg)


class _Family:
    def __init__(self, family: object):
        self.family = family

    def collect(self) -> list[object]:
        return [self.family.family()]  # type: ignore[attr-defined]


def test_a_histogram_scrapes_as_prometheus_clients_own_histogram_would() -> None:
    ours = HistogramSet("x_seconds", "Some time.")
    reg = CollectorRegistry()
    theirs = Histogram("x_seconds", "Some time.", ["model"], buckets=LATENCY, registry=reg)
    # on a bound, between bounds, below the first, above the last, zero
    values = {"a": [0.005, 0.0051, 0.001, 1, 2.5, 300, 301, 0.0], "b": [7.0]}
    for model, seen in values.items():
        for v in seen:
            ours.observe(model, v)
            theirs.labels(model).observe(v)
    assert _ours(ours) == _lines(reg)


def test_a_counter_scrapes_as_prometheus_clients_own_counter_would() -> None:
    ours = CounterSet("x_requests", "Requests.", ("model", "code"))
    reg = CollectorRegistry()
    theirs = Counter("x_requests", "Requests.", ["model", "code"], registry=reg)
    for labels, n in ((("a", "200"), 3), (("a", "404"), 1), (("b", "200"), 2.5)):
        ours.add(labels, n)
        theirs.labels(*labels).inc(n)
    assert ours.value(("a", "200")) == 3 and ours.value(("c", "200")) == 0
    assert _ours(ours) == _lines(reg)


def test_request_metrics_count_under_known_models_and_unknown() -> None:
    m = Metrics(known=lambda name: name == "tiny")
    m.request_done("tiny", 200, 0.02)
    m.request_done("made-up", 404, 0.001)
    m.first_byte("tiny", 0.01)
    m.waited("tiny", 0.5)
    m.tokens("tiny", {"prompt_tokens": 4, "completion_tokens": 9})
    m.tokens("tiny", {"input_tokens": 2, "output_tokens": -1})  # a negative count is not counted
    text = generate_latest(m.registry).decode()
    assert 'swapper_requests_total{code="200",model="tiny"} 1.0' in text
    assert 'swapper_requests_total{code="404",model="unknown"} 1.0' in text
    assert 'swapper_request_duration_seconds_bucket{le="0.025",model="tiny"} 1.0' in text
    assert 'swapper_request_duration_seconds_bucket{le="0.01",model="tiny"} 0.0' in text
    assert 'swapper_time_to_first_byte_seconds_count{model="tiny"} 1.0' in text
    assert 'swapper_queue_wait_seconds_sum{model="tiny"} 0.5' in text
    assert 'swapper_prompt_tokens_total{model="tiny"} 6.0' in text
    assert 'swapper_completion_tokens_total{model="tiny"} 9.0' in text
    assert "made-up" not in text
