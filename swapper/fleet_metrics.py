"""What an endpoint picker needs to route across many swapper pods: model residency and KV load.

The Gateway API Inference Extension's endpoint picker (EPP) reads the model-server protocol
(`docs/proposals/003-model-server-protocol` in kubernetes-sigs/gateway-api-inference-extension;
the extractor in `pkg/epp/framework/plugins/datalayer/extractor/metrics/` of GAIE v1.5.0 and of
llm-d/llm-d-router): one queue gauge, one running gauge, one KV-cache gauge (it takes one series
of each) and vLLM's `vllm:lora_requests_info` shape for adapters. swapper answers that protocol
for *models*, so the stock picker's LoRA-affinity scorer sends each request to a pod where its
model already is:

`swapper_lora_requests_info{running_lora_adapters, waiting_lora_adapters, max_lora}`, value the
scrape's wall-clock time (the picker keeps the series with the greatest value; there is one):
- `running_lora_adapters`: every name a request may use (id, aliases, adapter names) of each
  model that is ready, comma-separated. The picker matches the request's `model` against these.
- `waiting_lora_adapters`: the names of each model with requests (or a load) queued for it.
- `max_lora`: the picker judges room as `len(running) + len(waiting) < max_lora`, counting
  *names*, so max_lora = the names listed + free model slots, where free slots = how many more
  models of the typical size (median footprint of this pod's models: measured, declared, else
  estimated) fit in capacity minus the
  ledger without evicting anyone, capped by `max_models` and by the models not yet resident.
  "Room" then means exactly "this pod can load one more model without an eviction".

`swapper_kv_cache_usage_ratio` (0..1): the children's own KV-cache use, averaged over the
ready children weighted by their reserved bytes. vLLM reports `vllm:kv_cache_usage_perc`
(`vllm:gpu_cache_usage_perc` before v0.10). The llama-server swapper builds (llama.cpp vendored
in llama-cpp-python 0.3.36) exposes no KV gauge, only `llamacpp:requests_processing`; each of
its `parallel` slots owns an equal share of the context, so busy slots / slots stands in for it
(`llamacpp:kv_cache_usage_ratio` wins where an older build still exports it). Children are read
in the background at most once a second, started by a scrape, so a scrape never waits on a child.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable

import aiohttp
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families

if TYPE_CHECKING:
    from .catalog import ModelEntry
    from .scheduler import Scheduler

LORA_INFO = "swapper_lora_requests_info"
KV_USAGE = "swapper_kv_cache_usage_ratio"
REFRESH_SECONDS = 1.0  # children are read at most this often
STALE_SECONDS = 5.0  # a reading older than this is not used
CHILD_TIMEOUT = 1.0

# Read in this order; the first family a child exposes wins.
_KV_FAMILIES = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc", "llamacpp:kv_cache_usage_ratio")
_BUSY_SLOTS = "llamacpp:requests_processing"


def model_names(entry: ModelEntry) -> list[str]:
    """Every name a request may use for this model, in the order declared."""
    names = [entry.id, *entry.aliases, *(a.name for a in entry.adapters)]
    return list(dict.fromkeys(names))


@dataclass(frozen=True)
class Affinity:
    running: list[str]
    waiting: list[str]
    free_slots: int

    @property
    def max_lora(self) -> int:
        return len(self.running) + len(self.waiting) + self.free_slots


def affinity(s: Scheduler) -> Affinity:
    running: list[str] = []
    waiting: list[str] = []
    held = 0
    sizes: list[int] = []
    n_held = n_models = 0
    for m in s.models.values():
        n_models += 1
        public = m.state.public
        if m.state.value == "ready":
            running += model_names(m.entry)
        if len(m.queue):
            waiting += model_names(m.entry)
        if public in ("loaded", "loading"):
            held += m.reserved
            n_held += 1
        size = (m.measured or m.entry.footprint or (m.reserved if public in ("loaded", "loading") else 0)
                or _peek(s, m.entry) or m.entry.size)
        if size:
            sizes.append(size)
    free = max(0, s.capacity - held)
    if sizes:
        slots = int(free // statistics.median(sizes))
    else:
        slots = 1 if free > 0 and n_held == 0 else 0  # nothing known yet: an empty pod has room for one
    cfg = getattr(s, "cfg", None)
    cap = getattr(cfg, "max_models", 0) or 0
    if cap:
        slots = min(slots, max(0, cap - n_held))
    slots = min(slots, n_models - n_held)
    return Affinity(sorted(set(running)), sorted(set(waiting)), max(0, slots))


def _peek(s: Scheduler, entry: ModelEntry) -> int:
    """The estimate when it costs nothing to get (a scrape never reads a GGUF header)."""
    try:
        est = s.estimator.peek(entry)
    except Exception:
        return 0
    return est.bytes if est else 0


def child_kv_ratio(text: str, parallel: int) -> float | None:
    """KV-cache use (0..1) from a child's /metrics text, or None when it says nothing of it."""
    values: dict[str, list[float]] = {}
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            values.setdefault(sample.name, []).append(sample.value)
    for name in _KV_FAMILIES:
        if values.get(name):
            return _clip(max(values[name]))
    if values.get(_BUSY_SLOTS):
        return _clip(sum(values[_BUSY_SLOTS]) / max(1, parallel))
    return None


def _clip(x: float) -> float:
    return min(1.0, max(0.0, x))


class KvReader:
    """Children's KV-cache use, refreshed in the background when a scrape finds it older than a second."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.readings: dict[str, tuple[str, float, float]] = {}  # model -> (base_url, ratio, read at)
        self._last = float("-inf")
        self._task: asyncio.Task | None = None

    def poke(self, s: Scheduler) -> None:
        """Start a refresh when due; never waits for it (scrapes run on the event loop)."""
        if self._task is not None and not self._task.done():
            return
        if self.clock() - self._last < REFRESH_SECONDS:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._last = self.clock()
        self._task = loop.create_task(self.refresh(s))

    async def refresh(self, s: Scheduler) -> None:
        targets = [(m.id, url, m.entry.parallel) for m in list(s.models.values())
                   if m.state.value == "ready" and (url := getattr(m.instance, "base_url", None))]
        if not targets:
            return
        timeout = aiohttp.ClientTimeout(total=CHILD_TIMEOUT)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            results = await asyncio.gather(*(self._read(session, url, par) for _, url, par in targets),
                                           return_exceptions=True)
        now = self.clock()
        for (mid, url, _), r in zip(targets, results):
            if isinstance(r, float):
                self.readings[mid] = (url, r, now)

    async def _read(self, session: aiohttp.ClientSession, url: str, parallel: int) -> float | None:
        async with session.get(url + "/metrics") as resp:
            if resp.status != 200:
                return None
            return child_kv_ratio(await resp.text(), parallel)

    def node_ratio(self, s: Scheduler) -> float:
        """Reserved-bytes-weighted mean over ready children with a fresh reading of this child."""
        now = self.clock()
        num = den = 0.0
        for m in s.models.values():
            r = self.readings.get(m.id)
            if (m.state.value != "ready" or r is None or now - r[2] > STALE_SECONDS
                    or r[0] != getattr(m.instance, "base_url", None)):
                continue
            w = float(m.reserved or 1)
            num += r[1] * w
            den += w
        return num / den if den else 0.0


class FleetCollector:
    """Registered beside the scheduler collector; reads scheduler state at scrape time."""

    def __init__(self, scheduler: Scheduler, wall: Callable[[], float] = time.time):
        self.scheduler = scheduler
        self.wall = wall
        self.kv = KvReader()

    def collect(self) -> Iterable[Any]:
        s = self.scheduler
        a = affinity(s)
        info = GaugeMetricFamily(
            LORA_INFO, "Models resident (running) and queued (waiting) under every name a request may use, "
            "in vLLM's lora_requests_info shape for an endpoint picker; value: scrape time.",
            labels=["running_lora_adapters", "waiting_lora_adapters", "max_lora"])
        info.add_metric([",".join(a.running), ",".join(a.waiting), str(a.max_lora)], self.wall())
        slots = GaugeMetricFamily("swapper_free_model_slots",
                                  "Models of typical size that still fit without an eviction.")
        slots.add_metric([], a.free_slots)
        self.kv.poke(s)
        kv = GaugeMetricFamily(KV_USAGE, "KV-cache use of the ready children (0..1), weighted by their bytes.")
        kv.add_metric([], self.kv.node_ratio(s))
        return [info, slots, kv]
