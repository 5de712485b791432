"""What the stock endpoint picker reads from swapper's /metrics, parsed exactly as it parses it.

Each test drives the scheduler (fakes, no processes), renders the real metrics registry, and runs
it through the EPP's extractor (tests/epp.py) with the engine mapping the chart ships; then it
asks the EPP's LoRA-affinity scorer where a request would go.
"""

from __future__ import annotations

import asyncio
import random
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from aiohttp import web
from prometheus_client import generate_latest

import epp
from conftest import REPO, link, synth_file
from schedfakes import MiB, FakeClock, FakeEstimator, FakeLauncher, World
from swapper.catalog import Adapter, Catalog, ModelEntry
from swapper.fleet_metrics import LORA_INFO, child_kv_ratio, model_names
from swapper.gpu import FakeProbe
from swapper.metrics import Metrics
from swapper.scheduler import Scheduler, SchedulerConfig
from swapper.units import SizeSpec

VALUES = yaml.safe_load((REPO / "charts" / "swapper" / "values.yaml").read_text())
EPP_CONFIG = yaml.safe_load(VALUES["inferencepool"]["inferenceExtension"]["pluginsCustomConfig"]["swapper-plugins.yaml"])
POD_LABELS = {"app.kubernetes.io/name": "swapper", "inference.networking.k8s.io/engine-type": "swapper"}


def mapping() -> dict[str, str]:
    name, engine = epp.engine_mapping(EPP_CONFIG, POD_LABELS)
    assert name == "swapper"
    return engine


def fleet_world(entries: list[ModelEntry], sizes: dict[str, int], capacity: int, *, auto: bool = True,
                sleepable: frozenset[str] = frozenset(), **cfg: object) -> tuple[World, Metrics]:
    probe = FakeProbe(total=64 << 30)
    clock = FakeClock()
    launcher = FakeLauncher(probe, footprints=dict(sizes), auto=auto, sleepable=set(sleepable))
    est = FakeEstimator(dict(sizes))
    config = SchedulerConfig(budget=SizeSpec(bytes=capacity), reserve=0, **cfg)  # type: ignore[arg-type]
    sched = Scheduler(Catalog(entries), probe, launcher, est, config, clock=clock, wall=clock)
    metrics = Metrics()
    metrics.attach(sched)
    return World(sched, launcher, probe, clock, est), metrics


def model(name: str, aliases: tuple[str, ...] = (), adapters: tuple[str, ...] = (), sleep: bool = False) -> ModelEntry:
    return ModelEntry(id=name, name=name, engine="llamacpp", path=None, source="config", aliases=aliases,
                      adapters=tuple(Adapter(a, Path(f"/m/{a}.gguf")) for a in adapters), sleep=sleep)


def scrape(metrics: Metrics) -> epp.EndpointMetrics:
    return epp.extract(generate_latest(metrics.registry).decode(), mapping())


async def request(w: World, name: str) -> None:
    async with w.sched.acquire(name):
        pass


def three_models(**kw: object) -> tuple[World, Metrics]:
    entries = [model("qwen", aliases=("coder",), adapters=("sql-lora",)), model("llama"), model("gemma")]
    return fleet_world(entries, {"qwen": 400 * MiB, "llama": 400 * MiB, "gemma": 400 * MiB},
                       capacity=1000 * MiB, **kw)  # two of the three fit


def test_every_name_a_request_may_use_is_listed():
    assert model_names(model("qwen", aliases=("coder", "q"), adapters=("sql-lora",))) == ["qwen", "coder", "q", "sql-lora"]


async def test_an_idle_pod_has_nothing_running_and_room_to_load():
    w, metrics = three_models()
    m = scrape(metrics)
    assert m.active_models == {} and m.waiting_models == {}
    assert m.max_active_models == 2  # two 400 MiB models fit in 1000 MiB
    assert epp.lora_affinity_score(m, "qwen") == 0.8  # room: a cold load, but no eviction


async def test_a_loaded_model_is_running_under_its_id_aliases_and_adapters():
    w, metrics = three_models()
    await request(w, "qwen")
    m = scrape(metrics)
    assert set(m.active_models) == {"qwen", "coder", "sql-lora"}
    assert m.waiting_models == {}
    # the picker counts names: three listed + room for one more 400 MiB model
    assert m.max_active_models == 4
    for name in ("qwen", "coder", "sql-lora"):
        assert epp.lora_affinity_score(m, name) == 1.0
    assert epp.lora_affinity_score(m, "llama") == 0.8


async def test_a_full_pod_scores_zero_for_a_model_it_would_have_to_evict_for():
    w, metrics = three_models()
    await request(w, "qwen")
    await request(w, "llama")
    m = scrape(metrics)
    assert set(m.active_models) == {"qwen", "coder", "sql-lora", "llama"}
    assert m.max_active_models == len(m.active_models)  # no free slot
    assert epp.lora_affinity_score(m, "gemma") == 0.0
    assert epp.lora_affinity_score(m, "llama") == 1.0


async def test_an_evicted_model_leaves_the_running_list():
    w, metrics = three_models()
    await request(w, "qwen")
    w.clock.advance(1)
    await request(w, "llama")
    w.clock.advance(1)
    await request(w, "gemma")  # evicts qwen, the least recently used
    await w.spin()
    m = scrape(metrics)
    assert set(m.active_models) == {"llama", "gemma"}
    assert epp.lora_affinity_score(m, "coder") == 0.0


async def test_queued_requests_for_a_loading_model_are_waiting_not_running():
    w, metrics = three_models(auto=False)
    task = asyncio.ensure_future(request(w, "qwen"))
    await w.spin()
    assert w.state("qwen") == "loading"
    m = scrape(metrics)
    assert m.active_models == {}
    assert set(m.waiting_models) == {"qwen", "coder", "sql-lora"}
    assert m.waiting_queue_size == 1  # swapper_queued_requests, the queue mapping
    # room is judged after the load in progress: 1000 - 400 MiB leaves one more slot
    assert m.max_active_models == 3 + 1
    w.launcher.finish("qwen")
    await task
    m = scrape(metrics)
    assert set(m.active_models) == {"qwen", "coder", "sql-lora"} and m.waiting_models == {}


async def test_a_sleeping_model_is_not_running():
    entries = [model("a", sleep=True), model("b")]
    w, metrics = fleet_world(entries, {"a": 600 * MiB, "b": 600 * MiB}, capacity=1000 * MiB,
                             sleepable=frozenset({"a"}))
    await request(w, "a")
    await request(w, "b")  # a goes to sleep to make room
    await w.spin()
    assert w.state("a") == "sleeping"
    m = scrape(metrics)
    assert set(m.active_models) == {"b"}
    assert epp.lora_affinity_score(m, "a") == 0.0


async def test_max_models_caps_the_free_slots():
    w, metrics = three_models(max_models=1)
    await request(w, "llama")
    m = scrape(metrics)
    assert m.max_active_models == len(m.active_models) == 1
    assert epp.lora_affinity_score(m, "qwen") == 0.0


async def test_the_picker_takes_the_newest_series_and_trims_spaces():
    """The extractor's own rules on a hand-written exposition, so the parser itself is checked."""
    text = (f'# TYPE {LORA_INFO} gauge\n'
            f'{LORA_INFO}{{running_lora_adapters="old",waiting_lora_adapters="",max_lora="1"}} 100.0\n'
            f'{LORA_INFO}{{running_lora_adapters="a, b ,c",waiting_lora_adapters=" d",max_lora="5"}} 200.0\n'
            '# TYPE swapper_queued_requests gauge\nswapper_queued_requests 3.0\n'
            '# TYPE swapper_running_requests gauge\nswapper_running_requests 2.0\n'
            '# TYPE swapper_kv_cache_usage_ratio gauge\nswapper_kv_cache_usage_ratio 0.25\n')
    m = epp.extract(text, mapping())
    assert set(m.active_models) == {"a", "b", "c"} and set(m.waiting_models) == {"d"}
    assert m.max_active_models == 5
    assert (m.waiting_queue_size, m.running_requests_size, m.kv_cache_usage_percent) == (3, 2, 0.25)


async def test_one_series_per_metric_the_picker_reads():
    w, metrics = three_models()
    await request(w, "qwen")
    fams = epp.families(generate_latest(metrics.registry).decode())
    for key in ("queuedRequestsSpec", "runningRequestsSpec", "kvUsageSpec", "loraSpec"):
        spec = epp.parse_spec(mapping()[key])
        assert len(fams[spec.name]) == 1, spec.name


# ------------------------------------------------------------------------------ KV-cache use


LLAMA_METRICS = """\
# HELP llamacpp:requests_processing Number of requests processing
# TYPE llamacpp:requests_processing gauge
llamacpp:requests_processing 3
# TYPE llamacpp:requests_deferred gauge
llamacpp:requests_deferred 0
"""
VLLM_METRICS = """\
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.42
"""


def test_child_kv_use_from_each_engines_own_metrics():
    assert child_kv_ratio(VLLM_METRICS, parallel=1) == pytest.approx(0.42)
    assert child_kv_ratio(VLLM_METRICS.replace("kv_cache_usage_perc", "gpu_cache_usage_perc"), 1) == pytest.approx(0.42)
    assert child_kv_ratio(LLAMA_METRICS, parallel=4) == pytest.approx(0.75)  # busy slots / slots
    assert child_kv_ratio(LLAMA_METRICS, parallel=2) == 1.0
    assert child_kv_ratio("# TYPE other gauge\nother 1\n", parallel=1) is None


async def test_node_kv_use_is_read_from_the_children_without_blocking_a_scrape():
    body = {"text": LLAMA_METRICS}

    async def child_metrics(_: web.Request) -> web.Response:
        return web.Response(text=body["text"])

    app = web.Application()
    app.router.add_get("/metrics", child_metrics)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        entries = [ModelEntry(id="m", name="m", engine="llamacpp", path=None, source="config", parallel=4)]
        w, metrics = fleet_world(entries, {"m": 100 * MiB}, capacity=1000 * MiB)
        await request(w, "m")
        w.sched.models["m"].instance.base_url = f"http://127.0.0.1:{port}"  # type: ignore[union-attr]
        assert scrape(metrics).kv_cache_usage_percent == 0.0  # first scrape starts the read
        for _ in range(200):  # bounded poll: the background read lands
            await asyncio.sleep(0.05)
            if scrape(metrics).kv_cache_usage_percent:
                break
        assert scrape(metrics).kv_cache_usage_percent == pytest.approx(0.75)
    finally:
        await runner.cleanup()


# ------------------------------------------------------------------------------ the benchmark's front


def fleet_pick():
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from bench import fleet_pick as fp
    return fp


async def test_the_benchmark_front_reads_metrics_as_the_picker_does():
    fp = fleet_pick()
    w, metrics = three_models(auto=False)
    done = asyncio.ensure_future(request(w, "llama"))
    await w.spin()
    w.launcher.finish("llama")
    await done
    loading = asyncio.ensure_future(request(w, "qwen"))
    await w.spin()
    text = generate_latest(metrics.registry).decode()
    ours, theirs = fp.parse(text), epp.extract(text, mapping())
    assert ours.active == set(theirs.active_models) == {"llama"}
    assert ours.waiting == set(theirs.waiting_models) == {"qwen", "coder", "sql-lora"}
    assert (ours.max_models, ours.queue, ours.running, ours.kv) == (
        theirs.max_active_models, theirs.waiting_queue_size, theirs.running_requests_size, theirs.kv_cache_usage_percent)
    w.launcher.finish("qwen")
    await loading


def test_the_benchmark_front_prefers_the_pod_with_the_model():
    fp = fleet_pick()
    rng = random.Random(0)
    has_it = fp.PodMetrics(queue=2, active={"a", "a-alias"}, max_models=2)
    empty = fp.PodMetrics(queue=0, max_models=2)
    full = fp.PodMetrics(queue=0, active={"b", "c"}, max_models=2)
    pods = [empty, full, has_it]
    assert {fp.pick_scorer(pods, "a-alias", rng) for _ in range(50)} == {2}
    assert {fp.pick_filter(pods, "a", rng) for _ in range(50)} <= {2, 0}  # 0: the 0.1% exploration
    assert {fp.pick_scorer(pods, "d", rng) for _ in range(50)} == {0}  # room beats a full pod


# ------------------------------------------------------------------------------ a real pod


@pytest.mark.real
def test_a_real_pod_reports_residency_and_kv_use_to_the_picker(swapper_factory, tmp_path, openai_client,
                                                               gemma_file):
    """Real swapper, real llama-server children: what the picker reads after loads, an eviction
    and while a stream occupies the only slot of a child (Gemma: slow enough on a CPU that the
    stream is still running across several scrapes)."""
    d = tmp_path / "models"
    config = {"models": {"tiny-a": {"path": str(link(gemma_file, d / "tiny-a.gguf")), "aliases": ["a"]},
                         "tiny-b": {"path": str(link(synth_file(8, 2), d / "tiny-b.gguf"))}}}
    s = swapper_factory("--max-models", "1", config=config)
    client = openai_client(s)

    def picker() -> epp.EndpointMetrics:
        return epp.extract(s.get("/metrics").text, mapping())

    m = picker()
    assert m.active_models == {} and m.max_active_models >= 1
    client.completions.create(model="a", prompt="hi", max_tokens=1)
    m = picker()
    assert set(m.active_models) == {"tiny-a", "a"} and m.max_active_models == 2  # max_models 1: no room
    assert epp.lora_affinity_score(m, "a") == 1.0 and epp.lora_affinity_score(m, "tiny-b") == 0.0

    # a long stream holds tiny-a's only slot: the child's busy slot shows as KV use
    done = threading.Event()

    def stream() -> None:
        try:  # closed on leaving, so swapper cancels the generation and tiny-a goes idle
            with client.completions.create(model="tiny-a", prompt="go", max_tokens=1000, stream=True,
                                           extra_body={"ignore_eos": True}) as events:
                for _ in events:
                    if done.is_set():
                        break
        finally:
            done.set()

    t = threading.Thread(target=stream)
    t.start()
    try:
        deadline = time.monotonic() + 60
        seen = picker()
        while time.monotonic() < deadline and not done.is_set() and not (
                seen.kv_cache_usage_percent == 1.0 and seen.running_requests_size == 1):
            time.sleep(0.1)
            seen = picker()
        assert not done.is_set() or seen.kv_cache_usage_percent == 1.0, "the stream ended before it was seen"
        assert seen.kv_cache_usage_percent == 1.0, "one busy slot of one should read as a full KV cache"
        assert seen.running_requests_size == 1
    finally:
        done.set()
        t.join(120)

    client.completions.create(model="tiny-b", prompt="hi", max_tokens=1)  # evicts tiny-a
    m = picker()
    assert set(m.active_models) == {"tiny-b"}
