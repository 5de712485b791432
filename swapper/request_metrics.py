"""The per-request metrics, kept as plain numbers and turned into prometheus samples when scraped.

Why not prometheus-client's `Counter` and `Histogram` for these five: every proxied request
updates all of them, and each update takes a lock and goes through the client's value classes.
On a box where the front shares a core with the engine, each request runs that code cold; taking
those updates off the request path saved ~0.05 ms of front CPU per request (bench/PROFILE.md).
Here an update is a dictionary lookup and an addition. The event loop is the only writer and the
only reader (`/metrics` is answered on it), so there is no lock; what a scrape shows (names,
labels, buckets, `_created`) is what those classes showed, built with prometheus-client's own
collector types.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from typing import Iterable

from prometheus_client.metrics_core import CounterMetricFamily, Metric
from prometheus_client.utils import floatToGoString

try:  # honoured as the client's own metrics honour it (PROMETHEUS_DISABLE_CREATED_SERIES)
    from prometheus_client.metrics import _use_created as USE_CREATED
except ImportError:  # pragma: no cover - an older client
    USE_CREATED = True

LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Count:
    __slots__ = ("value", "created")

    def __init__(self) -> None:
        self.value = 0.0
        self.created = time.time()


class Hist:
    """Bucket counts (not cumulative: a scrape adds them up) and the sum of what was observed."""

    __slots__ = ("counts", "sum", "created")

    def __init__(self, bounds: int) -> None:
        self.counts = [0] * (bounds + 1)  # the last one: above every bound
        self.sum = 0.0
        self.created = time.time()


class CounterSet:
    """One counter family: a `Count` per label tuple, made on first use."""

    def __init__(self, name: str, doc: str, labels: tuple[str, ...]):
        self.name, self.doc, self.labels = name, doc, labels
        self.series: dict[tuple[str, ...], Count] = {}

    def add(self, labels: tuple[str, ...], amount: float = 1.0) -> None:
        c = self.series.get(labels)
        if c is None:
            c = self.series[labels] = Count()
        c.value += amount

    def value(self, labels: tuple[str, ...]) -> float:
        c = self.series.get(labels)
        return c.value if c is not None else 0.0

    def family(self) -> CounterMetricFamily:
        fam = CounterMetricFamily(self.name, self.doc, labels=self.labels)
        for labels, c in self.series.items():
            fam.add_metric(labels, c.value, created=c.created if USE_CREATED else None)
        return fam


class HistogramSet:
    """One histogram family over fixed bounds: a `Hist` per model, made on first use."""

    def __init__(self, name: str, doc: str, bounds: tuple[float, ...] = LATENCY):
        self.name, self.doc, self.bounds = name, doc, bounds
        self._les = [floatToGoString(b) for b in bounds] + ["+Inf"]
        self.series: dict[str, Hist] = {}

    def observe(self, model: str, seconds: float) -> None:
        h = self.series.get(model)
        if h is None:
            h = self.series[model] = Hist(len(self.bounds))
        h.counts[bisect_left(self.bounds, seconds)] += 1  # a bound is `le`: the first one >= seconds
        h.sum += seconds

    def family(self) -> Metric:
        fam = Metric(self.name, self.doc, "histogram")
        for model, h in self.series.items():
            acc = 0
            for le, n in zip(self._les, h.counts):
                acc += n
                fam.add_sample(self.name + "_bucket", {"model": model, "le": le}, float(acc))
            fam.add_sample(self.name + "_count", {"model": model}, float(acc))
            fam.add_sample(self.name + "_sum", {"model": model}, h.sum)
            if USE_CREATED:
                fam.add_sample(self.name + "_created", {"model": model}, h.created)
        return fam


class RequestMetrics:
    """What each proxied request adds: its status, its duration, its time to the first byte, its
    wait for the model and the tokens its answer reported."""

    def __init__(self) -> None:
        self.requests = CounterSet("swapper_requests", "Requests answered, by model and HTTP status.",
                                   ("model", "code"))
        self.duration = HistogramSet("swapper_request_duration_seconds",
                                     "Time from request to the end of the response.")
        self.ttfb = HistogramSet("swapper_time_to_first_byte_seconds",
                                 "Time from request to the first response byte.")
        self.prompt_tokens = CounterSet("swapper_prompt_tokens", "Prompt tokens reported in responses' usage.",
                                        ("model",))
        self.completion_tokens = CounterSet("swapper_completion_tokens",
                                            "Completion tokens reported in responses' usage.", ("model",))
        self.queue_wait = HistogramSet("swapper_queue_wait_seconds", "Time a request waited for its model.")

    def collect(self) -> Iterable[Metric]:
        return [self.requests.family(), self.duration.family(), self.ttfb.family(),
                self.prompt_tokens.family(), self.completion_tokens.family(), self.queue_wait.family()]
