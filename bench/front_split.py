#!/usr/bin/env python3
"""Front CPU per request, swapper against llama.cpp's router mode, split into user and system time.

`make bench` reports the fronts' CPU per request; this answers where it goes. It starts both
fronts over the same models folder (one synthetic 16 MiB model, one slot, every server on the
server CPUs as bench/run.py pins them), warms them, then runs each workload in interleaved rounds
and prints, per request: the front's CPU (its own process, children excluded), its user and
system parts, and the ratio. `stream8` is an 8-token stream: against the 64-token `stream` it
separates what a stream costs once (connections, head) from what each token costs.

    python bench/front_split.py [--rounds 3] [--workloads short,stream,stream8]
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.driver import LoadGen, completion  # noqa: E402
from bench.models import link_dir, synth  # noqa: E402
from bench.servers import Layout, find_llama_server, start_router, start_swapper, swapper_config  # noqa: E402

WORKLOADS = {"short": (False, 8, 1000), "stream": (True, 64, 64), "stream8": (True, 8, 200)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workloads", default="short,stream,stream8")
    ap.add_argument("--concurrency", default="1,8")
    a = ap.parse_args()
    layout = Layout.detect(find_llama_server())
    layout.pin_self()
    work = Path(tempfile.mkdtemp(prefix="swapper-split-"))
    models = link_dir(work / "models", {"tiny": synth(16, 1)})
    servers = {"swapper": start_swapper(layout, work / "swapper", swapper_config(layout), models_dir=models),
               "router": start_router(layout, models, work / "router", 1)}
    load = LoadGen(layout.client_cpus)
    try:
        for s in servers.values():
            s.wait_healthy()
            load.run(s.url, completion("tiny", 8, False), 20, 2)
        print("workload   conc  front ms/request (user + system)           swapper/router")
        for name in a.workloads.split(","):
            stream, tokens, n = WORKLOADS[name]
            body = completion("tiny", tokens, stream)
            for c in (int(x) for x in a.concurrency.split(",")):
                cpu: dict[tuple[str, str], float] = collections.defaultdict(float)
                for r in range(a.rounds):
                    for kind in (list(servers) if r % 2 == 0 else list(servers)[::-1]):
                        s = servers[kind]
                        proc = psutil.Process(s.proc.pid)
                        t0 = proc.cpu_times()
                        reqs, _ = load.run(s.url, body, n, c)
                        t1 = proc.cpu_times()
                        bad = [q for q in reqs if q.status != 200]
                        if bad:
                            raise SystemExit(f"{kind}: {len(bad)} requests failed: {bad[0]}")
                        cpu[(kind, "user")] += (t1.user - t0.user) * 1000 / n / a.rounds
                        cpu[(kind, "sys")] += (t1.system - t0.system) * 1000 / n / a.rounds
                total = {k: cpu[(k, "user")] + cpu[(k, "sys")] for k in servers}
                print(f"{name:9s} {c:5d}  swapper {total['swapper']:.2f} ({cpu[('swapper', 'user')]:.2f} + "
                      f"{cpu[('swapper', 'sys')]:.2f})  router {total['router']:.2f} ({cpu[('router', 'user')]:.2f} + "
                      f"{cpu[('router', 'sys')]:.2f})  {total['swapper'] / total['router']:.2f}", flush=True)
    finally:
        load.close()
        for s in servers.values():
            s.stop()


if __name__ == "__main__":
    main()
