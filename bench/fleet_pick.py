"""How a front picks a swapper pod for a request: the endpoint picker's rules, round-robin, random.

A measuring instrument for bench/fleet.py only; swapper itself never picks pods. The EPP policies
read each pod's real /metrics the way the EPP's extractor does (metric names from the chart's
`swapper` engine mapping; the LoRA series with the greatest value; names split on "," and
trimmed) and then apply, transcribed from kubernetes-sigs/gateway-api-inference-extension:

- `epp-filter`: the published decision tree (v0.3.0 pkg/epp/scheduling/scheduler.go, filter.go):
  pods with queue < 128 -> LoRA soft affinity (pods with the model, with probability 0.999, else
  pods with room) -> least queue -> least KV cache -> random among the rest; when every pod
  queues >= 128: least queue -> LoRA affinity -> least KV. "Room" is the current scorer's test,
  active + waiting < max_lora (v0.3 looked at active alone).
- `epp-scorer`: what the chart configures on EPP v1.5.0: lora-affinity-scorer x10, queue-scorer
  x1, kv-cache-utilization-scorer x0.5, max-score-picker (ties broken at random).
tests/test_fleet_metrics.py checks this parser against the test suite's transcription.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Sequence

from prometheus_client.parser import text_string_to_metric_families

QUEUE, RUNNING, KV, LORA = ("swapper_queued_requests", "swapper_running_requests",
                            "swapper_kv_cache_usage_ratio", "swapper_lora_requests_info")
QUEUEING_THRESHOLD_LORA = 128
LORA_AFFINITY_THRESHOLD = 0.999


@dataclass
class PodMetrics:
    queue: int = 0
    running: int = 0
    kv: float = 0.0
    active: set[str] = field(default_factory=set)
    waiting: set[str] = field(default_factory=set)
    max_models: int = 0


def parse(text: str) -> PodMetrics:
    out = PodMetrics()
    best = -1.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if fam.name == QUEUE and not s.labels:
                out.queue = int(s.value)
            elif fam.name == RUNNING and not s.labels:
                out.running = int(s.value)
            elif fam.name == KV and not s.labels:
                out.kv = s.value
            elif fam.name == LORA and s.value > best:
                best = s.value
                out.active = {n.strip() for n in s.labels.get("running_lora_adapters", "").split(",") if n.strip()}
                out.waiting = {n.strip() for n in s.labels.get("waiting_lora_adapters", "").split(",") if n.strip()}
                out.max_models = int(s.labels["max_lora"]) if s.labels.get("max_lora") else 0
    return out


def _least(pods: list[int], ms: Sequence[PodMetrics], key: str) -> list[int]:
    """leastQueuingFilterFunc / leastKVCacheFilterFunc: the lowest (max-min)/n band."""
    vals = [getattr(ms[i], key) for i in pods]
    lo, hi = min(vals), max(vals)
    return [i for i in pods if lo <= getattr(ms[i], key) <= lo + (hi - lo) / len(pods)]


def _room(m: PodMetrics) -> bool:
    return len(m.active) + len(m.waiting) < m.max_models


def _lora_soft_affinity(pods: list[int], ms: Sequence[PodMetrics], model: str, rng: random.Random) -> list[int]:
    affinity = [i for i in pods if model in ms[i].active]
    available = [i for i in pods if model not in ms[i].active and _room(ms[i])]
    if affinity and available:
        return affinity if rng.random() < LORA_AFFINITY_THRESHOLD else available
    return affinity or available or pods  # the tree goes on with what the filter had when it empties


def pick_filter(ms: Sequence[PodMetrics], model: str, rng: random.Random) -> int:
    pods = list(range(len(ms)))
    low = [i for i in pods if ms[i].queue < QUEUEING_THRESHOLD_LORA]
    if low:
        pods = _lora_soft_affinity(low, ms, model, rng)
        pods = _least(pods, ms, "queue")
    else:
        pods = _least(pods, ms, "queue")
        pods = _lora_soft_affinity(pods, ms, model, rng)
    pods = _least(pods, ms, "kv")
    return rng.choice(pods)


def _lora_score(m: PodMetrics, model: str) -> float:
    if model in m.active:
        return 1.0
    if _room(m):
        return 0.8
    return 0.6 if model in m.waiting else 0.0


def pick_scorer(ms: Sequence[PodMetrics], model: str, rng: random.Random,
                weights: tuple[float, float, float] = (10.0, 1.0, 0.5)) -> int:
    qs = [m.queue for m in ms]
    lo, hi = min(qs), max(qs)
    scores = []
    for m in ms:
        queue = 1.0 if hi == lo else (hi - m.queue) / (hi - lo)
        scores.append(weights[0] * _lora_score(m, model) + weights[1] * queue + weights[2] * (1.0 - m.kv))
    top = max(scores)
    return rng.choice([i for i, s in enumerate(scores) if s == top])


class RoundRobin:
    def __init__(self) -> None:
        self.n = 0

    def __call__(self, n_pods: int) -> int:
        self.n += 1
        return (self.n - 1) % n_pods
