#!/usr/bin/env python3
"""Front CPU per request, swapper against llama.cpp's router mode, split into user and system time.

`make bench` reports the fronts' CPU per request; this answers where it goes. It starts both
fronts over the same models folder (one synthetic 16 MiB model, one slot, every server on the
server CPUs as bench/run.py pins them), warms them, then runs each workload in interleaved rounds
and prints, per request: the front's CPU (its own process, children excluded), its user and
system parts, and the ratio. `stream8` is an 8-token stream: against the 64-token `stream` it
separates what a stream costs once (connections, head) from what each token costs. `idle` is
each front's CPU per second with a model loaded and no request: what its timers cost.

`stream-pooled` and `stream8-pooled` are the same streams from a client that keeps its connection
wherever the server does, as OpenAI's SDK does (bench/loadgen.py): swapper keeps it, router mode
closes it after each stream.

`--baseline DIR` adds a third front, swapper from another tree (a `git worktree` of an earlier
revision), measured in the same rounds: a before/after on the same machine state. `--floor` adds
bench/relay_floor.py in front of a direct llama-server: what a Python front costs at least.

    python bench/front_split.py [--rounds 3] [--workloads short,stream,stream8,idle] [--baseline DIR] [--floor]
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time
import tempfile
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.driver import LoadGen, completion  # noqa: E402
from bench.models import link_dir, synth  # noqa: E402
from bench.servers import (Layout, find_llama_server, start_direct, start_floor, start_router,  # noqa: E402
                           start_swapper, swapper_config)

WORKLOADS = {"short": (False, 8, 1000), "stream": (True, 64, 64), "stream8": (True, 8, 200)}  # (stream, tokens, n)
# the same streams from a client that keeps its connection where the server does (OpenAI's SDK)
WORKLOADS |= {f"{k}-pooled": v for k, v in WORKLOADS.items() if v[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workloads", default="short,stream,stream8,idle")
    ap.add_argument("--concurrency", default="1,8")
    ap.add_argument("--baseline", help="another swapper tree to measure beside this one")
    ap.add_argument("--floor", action="store_true",
                    help="also bench/relay_floor.py in front of a direct llama-server: a Python front's floor")
    a = ap.parse_args()
    layout = Layout.detect(find_llama_server())
    layout.pin_self()
    work = Path(tempfile.mkdtemp(prefix="swapper-split-"))
    models = link_dir(work / "models", {"tiny": synth(16, 1)})
    servers = {"swapper": start_swapper(layout, work / "swapper", swapper_config(layout), models_dir=models),
               "router": start_router(layout, models, work / "router", 1)}
    if a.baseline:
        os.environ["PYTHONPATH"] = str(Path(a.baseline).resolve())  # start_swapper puts it first
        servers["baseline"] = start_swapper(layout, work / "baseline", swapper_config(layout), models_dir=models)
        del os.environ["PYTHONPATH"]
    if a.floor:
        servers["floor"] = start_floor(layout, start_direct(layout, models / "tiny.gguf", "tiny", work / "direct"),
                                       work / "floor")
    load = LoadGen(layout.client_cpus)
    try:
        for s in servers.values():
            s.wait_healthy()
            load.run(s.url, completion("tiny", 8, False), 20, 2)
        print("workload  conc  front          ms/request (user + system)   /router")
        for name in a.workloads.split(","):
            if name == "idle":
                idle(servers, a.rounds)
                continue
            stream, tokens, n = WORKLOADS[name]
            body = completion("tiny", tokens, stream)
            for c in (int(x) for x in a.concurrency.split(",")):
                cpu: dict[tuple[str, str], float] = collections.defaultdict(float)
                for r in range(a.rounds):
                    for kind in (list(servers) if r % 2 == 0 else list(servers)[::-1]):
                        s = servers[kind]
                        proc = psutil.Process(s.proc.pid)
                        t0, c0 = proc.cpu_times(), s.cpu_seconds()
                        reqs, _ = load.run(s.url, body, n, c, pooled=name.endswith("-pooled"))
                        t1, c1 = proc.cpu_times(), s.cpu_seconds()
                        bad = [q for q in reqs if q.status != 200]
                        if bad:
                            raise SystemExit(f"{kind}: {len(bad)} requests failed: {bad[0]}")
                        cpu[(kind, "user")] += (t1.user - t0.user) * 1000 / n / a.rounds
                        cpu[(kind, "sys")] += (t1.system - t0.system) * 1000 / n / a.rounds
                        cpu[(kind, "total")] += (c1 - c0) * 1000 / n / a.rounds
                report(name, str(c), servers, cpu)
    finally:
        load.close()
        for s in servers.values():
            s.stop()


def report(name: str, conc: str, servers: dict, cpu: dict[tuple[str, str], float], unit: str = "") -> None:
    """The total from the process's CPU clock (nanoseconds) where measured; the split from /proc
    (10 ms ticks, so user + system may differ from the total by a tick's share)."""
    total = {k: cpu.get((k, "total")) or cpu[(k, "user")] + cpu[(k, "sys")] for k in servers}
    for k in servers:
        ratio = total[k] / total["router"] if total["router"] else float("inf")
        print(f"{name:9s} {conc:>4s}  {k:9s} {total[k]:8.2f} ({cpu[(k, 'user')]:.2f} + {cpu[(k, 'sys')]:.2f}){unit}"
              f"  {ratio:.2f}", flush=True)


def idle(servers: dict, rounds: int, seconds: float = 5.0) -> None:
    """CPU each front spends per second with its model loaded and nothing to do (its timers)."""
    cpu: dict[tuple[str, str], float] = collections.defaultdict(float)
    procs = {k: psutil.Process(s.proc.pid) for k, s in servers.items()}
    for _ in range(rounds):
        t0 = {k: p.cpu_times() for k, p in procs.items()}
        time.sleep(seconds)
        for k, p in procs.items():
            t1 = p.cpu_times()
            cpu[(k, "user")] += (t1.user - t0[k].user) * 1000 / seconds / rounds
            cpu[(k, "sys")] += (t1.system - t0[k].system) * 1000 / seconds / rounds
    report("idle", "-", servers, cpu, unit=" ms/s")


if __name__ == "__main__":
    main()
