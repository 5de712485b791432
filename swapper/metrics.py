"""Prometheus metrics (`/metrics`): `swapper_` prefix, seconds and bytes as base units.

Counters and histograms are updated as things happen (those every proxied request updates as
plain numbers, folded into samples when scraped: request_metrics.py); gauges that describe the scheduler's
state (queue depth, in flight, resident models, ledger, probe, footprints) are read from it at
scrape time by a custom collector, so they can never drift from the truth. A model label is
only ever a known model id: anything else is counted under `unknown`, so clients cannot blow up
the label space with made-up names.

`swapper_queue_depth{model}` counts requests waiting for a model, including those waiting on a
cold swap. A Gateway API Inference Extension endpoint picker takes one series of each metric it
is pointed at, so the node-wide sums `swapper_queued_requests` and `swapper_running_requests`
(no labels) are what its queue and running mappings name; model residency and KV-cache use for
the picker live in `fleet_metrics.py`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

from .fleet_metrics import FleetCollector
from .request_metrics import RequestMetrics

if TYPE_CHECKING:
    from .scheduler import Model, Scheduler, SwapEvent

_LOAD = (0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)


class Metrics:
    def __init__(self, known: Callable[[str], bool] = lambda _: True):
        self.registry = CollectorRegistry()
        self.known = known
        r = self.registry
        self.per_request = RequestMetrics()
        r.register(self.per_request)
        self.swaps = Counter("swapper_swaps", "Model loads, evictions, sleeps and wakes, by reason.",
                             ["model", "action", "reason"], registry=r)
        self.load_duration = Histogram("swapper_load_duration_seconds", "Time from admission to a model being ready.",
                                       ["model"], buckets=_LOAD, registry=r)
        self.load_failures = Counter("swapper_load_failures", "Loads that failed (and children that died).",
                                     ["model"], registry=r)
        self._scheduler: Scheduler | None = None

    def label(self, model: str) -> str:
        return model if model and model != "unknown" and self.known(model) else "unknown"

    # ------------------------------------------------------------------ observations

    def request_done(self, model: str, status: int, seconds: float) -> None:
        m = self.label(model)
        pr = self.per_request
        pr.requests.add((m, str(status)))
        pr.duration.observe(m, seconds)

    def first_byte(self, model: str, seconds: float) -> None:
        self.per_request.ttfb.observe(self.label(model), seconds)

    def tokens(self, model: str, usage: dict[str, Any]) -> None:
        m = self.label(model)
        p = usage.get("prompt_tokens", usage.get("input_tokens"))
        c = usage.get("completion_tokens", usage.get("output_tokens"))
        if isinstance(p, (int, float)) and p >= 0:
            self.per_request.prompt_tokens.add((m,), p)
        if isinstance(c, (int, float)) and c >= 0:
            self.per_request.completion_tokens.add((m,), c)

    def swap(self, ev: SwapEvent) -> None:
        m = self.label(ev.model)
        if ev.action in ("fail", "exit"):
            self.load_failures.labels(m).inc()
            return
        self.swaps.labels(m, ev.action, ev.reason).inc()
        if ev.action in ("load", "wake"):
            self.load_duration.labels(m).observe(ev.seconds)

    def waited(self, model: str, seconds: float) -> None:
        self.per_request.queue_wait.observe(self.label(model), seconds)

    # ------------------------------------------------------------------ scheduler state

    def attach(self, scheduler: Scheduler) -> None:
        self._scheduler = scheduler
        scheduler.listeners.append(self.swap)
        scheduler.grant_listeners.append(self.waited)
        self.registry.register(_SchedulerCollector(self))
        self.registry.register(FleetCollector(scheduler))


class _SchedulerCollector:
    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def collect(self) -> Iterable[GaugeMetricFamily]:
        s = self.metrics._scheduler
        if s is None:
            return []
        depth = GaugeMetricFamily("swapper_queue_depth", "Requests waiting for a model (including cold swaps).", labels=["model"])
        queued = GaugeMetricFamily("swapper_queued_requests", "Requests waiting for any model (including cold swaps).")
        running = GaugeMetricFamily("swapper_running_requests", "Requests being served by any model.")
        inflight = GaugeMetricFamily("swapper_inflight_requests", "Requests being served by a model.", labels=["model"])
        state = GaugeMetricFamily("swapper_model_state", "1 for the state each model is in.", labels=["model", "state"])
        footprint = GaugeMetricFamily("swapper_model_footprint_bytes", "Measured (else estimated) bytes of each model.", labels=["model"])
        resident = GaugeMetricFamily("swapper_resident_models", "Models loaded (ready or draining).")
        cap = GaugeMetricFamily("swapper_capacity_bytes", "Budget minus reserve.", labels=["device"])
        ledger = GaugeMetricFamily("swapper_ledger_used_bytes", "Bytes the scheduler has reserved.", labels=["device"])
        probe_used = GaugeMetricFamily("swapper_probe_used_bytes", "Used memory as the probe reports it.", labels=["device"])
        probe_total = GaugeMetricFamily("swapper_probe_total_bytes", "Total memory as the probe reports it.", labels=["device"])
        host = GaugeMetricFamily("swapper_host_used_bytes", "Host bytes held by sleeping models.")
        placed = GaugeMetricFamily("swapper_model_device_bytes", "Bytes each model holds on each device.",
                                   labels=["model", "device"])
        n_res = n_queued = n_running = 0
        for m in s.models.values():
            waiting = sum(1 for w in m.queue if w.counts)
            n_queued += waiting
            n_running += m.inflight
            depth.add_metric([m.id], waiting)
            inflight.add_metric([m.id], m.inflight)
            state.add_metric([m.id, m.state.value], 1)
            size = m.measured or _known_estimate(s, m)
            if size:
                footprint.add_metric([m.id], size)
            if m.loaded:
                n_res += 1
        resident.add_metric([], n_res)
        queued.add_metric([], n_queued)
        running.add_metric([], n_running)
        for d in s.device_view():  # one series per planned device
            dev = d["id"]
            cap.add_metric([dev], d["capacity"])
            ledger.add_metric([dev], d["ledger"])
            for model, nbytes in d["models"].items():
                placed.add_metric([model, dev], nbytes)
            try:
                mem = s.probes[dev].memory()
                probe_used.add_metric([dev], mem.used)
                probe_total.add_metric([dev], mem.total)
            except Exception:
                pass
        host.add_metric([], s.host_used())
        return [depth, queued, inflight, running, state, footprint, resident, cap, ledger, probe_used,
                probe_total, host, placed]


def _known_estimate(s: Scheduler, m: Model) -> int | None:
    """The estimate when it costs nothing to get (a scrape never reads a GGUF header)."""
    try:
        est = s.estimator.peek(m.entry)
    except Exception:
        return None
    return est.bytes if est else None
