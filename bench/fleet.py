"""Fleet benchmark: N swapper pods on loopback, one request trace, four ways to pick a pod.

    python bench/fleet.py [--pods 3] [--models 8] [--requests 240] [--out bench/RESULTS-fleet.md]

Each pod is a real `swapper serve` (CPU, llama-server children, synthetic GGUFs from
swapper.synth) whose budget holds about `--slots` models. The trace has Zipf-like model
popularity (s = 1.1), arrives in bursts, and names models by id or alias. The same trace is
replayed against fresh pods for each policy (bench/fleet_pick.py): the endpoint picker's filter
tree and its scorer configuration (both reading every pod's real /metrics before each pick),
round-robin and random. Reported: cold loads per 1,000 requests (loads and wakes counted from
each pod's own `swapper_swaps_total`), latency and time to first token (streamed).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import platform
import random
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.fleet_pick import RoundRobin, parse, pick_filter, pick_scorer  # noqa: E402
from bench.loadgen import Client  # noqa: E402
from bench.models import synth  # noqa: E402
from bench.servers import (REPO, Layout, Server, find_llama_server, http_get, http_post, start_swapper,  # noqa: E402
                           swapper_config)
from bench.stats import percentile  # noqa: E402

POLICIES = ("epp-filter", "epp-scorer", "round-robin", "random")
LOADS = re.compile(r'^swapper_swaps_total\{[^}]*action="(load|wake)"[^}]*\} ([0-9.e+]+)$', re.M)
FOOTPRINT = re.compile(r'^swapper_model_footprint_bytes\{model="([^"]+)"\} ([0-9.e+]+)$', re.M)


@dataclass
class Arrival:
    at: float  # seconds from the start
    name: str  # model id or alias


def trace(models: list[str], n: int, rate: float, seed: int, zipf_s: float = 1.1) -> list[Arrival]:
    """Zipf popularity over a shuffled model order; bursts of 1-6 requests with exponential gaps."""
    rng = random.Random(seed)
    order = models[:]
    rng.shuffle(order)
    weights = [1.0 / (k + 1) ** zipf_s for k in range(len(order))]
    out: list[Arrival] = []
    t = 0.0
    while len(out) < n:
        burst = min(n - len(out), rng.choice((1, 1, 2, 3, 4, 6)))
        t += rng.expovariate(rate / 2.8)  # 2.8: mean burst size, so the mean rate is `rate`
        for _ in range(burst):
            m = rng.choices(order, weights)[0]
            name = f"{m}-alias" if rng.random() < 0.3 else m
            out.append(Arrival(t + rng.uniform(0, 0.05), name))
    return out


def model_files(count: int, size_mib: int) -> dict[str, Path]:
    return {f"m{i}": synth(size_mib, seed=300 + i, tag="-fleet") for i in range(count)}


def pod_config(layout: Layout, files: dict[str, Path], footprint: int | None) -> dict[str, Any]:
    cfg = swapper_config(layout, files, {n: footprint for n in files} if footprint else None)
    for name, spec in cfg["models"].items():
        spec["aliases"] = [f"{name}-alias"]
    return cfg


def calibrate(layout: Layout, files: dict[str, Path], work: Path) -> int:
    """One model's measured footprint on this machine (all synthetic models have the same shape)."""
    pod = start_swapper(layout, work / "calibrate", pod_config(layout, files, None))
    try:
        pod.wait_healthy(120)
        first = next(iter(files))
        status, _ = _post(pod, {"model": first, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
        if status != 200:
            raise RuntimeError(f"calibration request failed: {status}\n{pod.log_tail()}")
        sizes = {m: float(v) for m, v in FOOTPRINT.findall(_metrics(pod))}
        return int(sizes[first])
    finally:
        pod.stop()


def _post(pod: Server, body: dict[str, Any]) -> tuple[int, bytes]:
    return http_post(pod.port, "/v1/chat/completions", body, timeout=300)


def _metrics(pod: Server) -> str:
    return http_get(pod.port, "/metrics", 10)[1].decode()


def cold_loads(pod: Server) -> int:
    return int(sum(float(v) for _, v in LOADS.findall(_metrics(pod))))


async def replay(pods: list[Server], arrivals: list[Arrival], policy: str, seed: int,
                 max_tokens: int) -> tuple[list[list[Any]], dict[int, int]]:
    rng = random.Random(seed)
    rr = RoundRobin()
    client = Client(timeout=600)
    scrape = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
    picks: dict[int, int] = {}

    async def pod_metrics() -> list[Any]:
        async def one(p: Server) -> Any:
            async with scrape.get(p.url + "/metrics") as r:
                return parse(await r.text())
        return await asyncio.gather(*(one(p) for p in pods))

    async def send(a: Arrival) -> list[Any]:
        await asyncio.sleep(max(0.0, a.at - (time.perf_counter() - t0)))
        if policy == "epp-filter":
            i = pick_filter(await pod_metrics(), a.name, rng)
        elif policy == "epp-scorer":
            i = pick_scorer(await pod_metrics(), a.name, rng)
        elif policy == "round-robin":
            i = rr(len(pods))
        else:
            i = rng.randrange(len(pods))
        picks[i] = picks.get(i, 0) + 1
        body = {"model": a.name, "messages": [{"role": "user", "content": "Say something."}],
                "max_tokens": max_tokens, "stream": True}
        return await client.one(pods[i].url, "/v1/chat/completions", body)

    t0 = time.perf_counter()
    try:
        records = await asyncio.gather(*(send(a) for a in arrivals))
    finally:
        await client.close()
        await scrape.close()
    return list(records), picks


@dataclass
class Result:
    policy: str
    ok: int
    errors: int
    loads: int
    latency: list[float]
    ttft: list[float]
    picks: dict[int, int]
    seconds: float


def run_policy(layout: Layout, files: dict[str, Path], footprint: int, budget: int, args: argparse.Namespace,
               arrivals: list[Arrival], policy: str, work: Path) -> Result:
    pods = [start_swapper(layout, work / policy / f"pod{i}", pod_config(layout, files, footprint),
                          "--budget", str(budget), "--queue-size", "256")
            for i in range(args.pods)]
    try:
        for p in pods:
            p.wait_healthy(120)
        t = time.perf_counter()
        records, picks = asyncio.run(replay(pods, arrivals, policy, args.seed, args.max_tokens))
        seconds = time.perf_counter() - t
        loads = sum(cold_loads(p) for p in pods)
    finally:
        for p in pods:
            p.stop()
    good = [r for r in records if r[0] == 200]
    bad = [r for r in records if r[0] != 200]
    for r in bad[:3]:
        print(f"  {policy}: error {r[0]} {r[5]}", file=sys.stderr)
    return Result(policy, len(good), len(bad), loads, [r[3] for r in good],
                  [r[2] for r in good if r[2] is not None], picks, seconds)


def report(results: list[Result], args: argparse.Namespace, footprint: int, budget: int, n_req: int,
           layout: Layout) -> str:
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                           capture_output=True, text=True).stdout.strip()
    ms: Callable[[list[float], float], str] = lambda xs, q: f"{percentile(xs, q) * 1000:.0f}"
    lines = [
        "# Fleet benchmark: picking a swapper pod by model residency", "",
        f"Revision `{rev}{'-dirty' if dirty else ''}`, {time.strftime('%Y-%m-%d')}, "
        f"`python bench/fleet.py {' '.join(sys.argv[1:])}`.", "",
        f"{args.pods} swapper pods (processes on 127.0.0.1, CPU, llama-server children), {args.models} synthetic "
        f"models of {args.size_mib} MiB (measured footprint {footprint / 2**20:.0f} MiB each), budget "
        f"{budget / 2**20:.0f} MiB per pod = {args.slots} models. Trace: {n_req} requests, Zipf popularity "
        f"(s = 1.1), bursts of 1-6, mean {args.rate} req/s, 30% by alias, streamed, max_tokens {args.max_tokens}; "
        "the same trace for every policy, fresh pods for each.", "",
        f"Machine: {platform.machine()}, {len(layout.server_cpus)} CPUs shared with other work while this ran, so "
        "latencies are only comparable within this table; cold-load counts do not depend on speed.", "",
        "| policy | ok | errors | cold loads | per 1,000 requests | p50 latency ms | p99 latency ms "
        "| p50 TTFT ms | p99 TTFT ms | requests per pod |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        per = 1000 * r.loads / max(1, r.ok + r.errors)
        spread = "/".join(str(r.picks.get(i, 0)) for i in range(args.pods))
        lines.append(f"| {r.policy} | {r.ok} | {r.errors} | {r.loads} | {per:.0f} | {ms(r.latency, 50)} | "
                     f"{ms(r.latency, 99)} | {ms(r.ttft, 50)} | {ms(r.ttft, 99)} | {spread} |")
    if args.pods * args.slots >= args.models:
        lines += ["", f"The fewest cold loads possible is {args.models}: {args.pods} pods x {args.slots} slots hold "
                  "every model, so each needs loading once."]
    base = next((r for r in results if r.policy == "round-robin"), None)
    if base and base.loads:
        for r in results:
            if r.policy.startswith("epp"):
                lines.append("")
                lines.append(f"`{r.policy}` needed {r.loads} cold loads against round-robin's {base.loads} "
                             f"({100 * (1 - r.loads / base.loads):.0f}% fewer).")
    lines += ["", "Policies (bench/fleet_pick.py): `epp-filter` is the endpoint picker's published filter tree "
              "(least queue, LoRA/model affinity, least KV cache), `epp-scorer` the scorer weights the chart "
              "configures (affinity x10, queue x1, KV x0.5, max score); both read every pod's /metrics before "
              "each pick. Cold loads include the first load of each model on each pod.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pods", type=int, default=3)
    ap.add_argument("--models", type=int, default=8)
    ap.add_argument("--slots", type=int, default=3, help="models each pod's budget holds")
    ap.add_argument("--size-mib", type=int, default=16)
    ap.add_argument("--requests", type=int, default=240)
    ap.add_argument("--rate", type=float, default=2.0, help="mean requests per second")
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--seed", type=int, default=13)
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--work", type=Path, default=Path("/tmp/swapper-fleet-bench"))
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    layout = Layout.detect(find_llama_server(), pin=False)
    files = model_files(args.models, args.size_mib)
    footprint = calibrate(layout, files, args.work)
    footprint = int(footprint * 1.05)
    budget = footprint * args.slots + footprint // 2  # room for `slots` models, not one more
    arrivals = trace(list(files), args.requests, args.rate, args.seed)
    results = []
    for policy in args.policies.split(","):
        print(f"{policy}: {len(arrivals)} requests on {args.pods} pods ...", file=sys.stderr, flush=True)
        r = run_policy(layout, files, footprint, budget, args, arrivals, policy, args.work)
        print(f"  {r.loads} cold loads, {r.ok} ok, {r.errors} errors, {r.seconds:.0f}s", file=sys.stderr)
        results.append(r)
    text = report(results, args, footprint, budget, len(arrivals), layout)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0 if all(math.isfinite(percentile(r.latency, 50)) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
