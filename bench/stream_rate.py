#!/usr/bin/env python3
"""Streamed tokens/s through swapper against router mode, each over its own engine, many rounds.

Where a front's whole share of a stream is a few percent of the core it shares with the engine,
swapper and router mode differ by about 1% of streamed tokens/s, and one repetition of
`make bench` moves by 1-3% (more in a disturbed one). Its verdict on that row is then a coin
toss weighted by the truth. This runs the proxy-overhead section's stream cell alone (the same
servers, the same five targets per round, bench/overhead.py) for as many rounds as asked, and
prints per round and in summary: each front's tokens/s over its own engine's, swapper's ratio
over router mode's, and a bootstrap 90% interval of that ratio's median (resampled rounds).

`--identical` measures three llama-server processes started alike instead (same model,
arguments and CPU, no front): how far apart two engine processes can generate, which is why
bench/overhead.py holds each front against its own engine.

    python bench/stream_rate.py [--rounds 30] [--concurrency 8] [--streams 16] [--identical] [--out FILE]

`make bench-streams` writes bench/RESULTS-streams.md (about three minutes).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import random
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import overhead  # noqa: E402
from bench.context import PROFILES, Ctx  # noqa: E402
from bench.driver import LoadGen, RunStats, completion  # noqa: E402
from bench.machine import describe  # noqa: E402
from bench.report import md_table  # noqa: E402
from bench.models import synth  # noqa: E402
from bench.servers import Layout, find_llama_server, start_direct  # noqa: E402
from bench.stats import median, ratio  # noqa: E402


def interval(xs: list[float], rng: random.Random, draws: int = 4000, level: float = 0.90) -> tuple[float, float]:
    """Bootstrap interval of the median of `xs` (percentile method)."""
    meds = sorted(median(rng.choices(xs, k=len(xs))) for _ in range(draws))
    cut = int(draws * (1 - level) / 2)
    return meds[cut], meds[-cut - 1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--streams", type=int, default=16, help="streams per target and round")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--identical", action="store_true", help="three llama-servers started alike, no front")
    ap.add_argument("--out", type=Path, help="write the report (markdown) here")
    a = ap.parse_args(argv)
    command = " ".join(["python", "bench/stream_rate.py",
                        *(shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:]))])
    profile = dataclasses.replace(PROFILES["quick"], concurrency=(a.concurrency,), reps=a.rounds,
                                  stream_requests=((a.concurrency, a.streams),))
    binary = find_llama_server()
    layout = Layout.detect(binary)
    layout.pin_self()
    machine = describe(binary)
    work = Path(tempfile.mkdtemp(prefix="swapper-rate-"))
    load = LoadGen(layout.client_cpus)
    ctx = Ctx(profile, layout, load, work)
    errors: dict[str, list[str]] = {}
    try:
        if a.identical:
            text = identical(ctx, a, machine, command)
        else:
            servers = overhead.start(ctx)
            try:
                per = overhead.measure(ctx, servers, errors, (("stream", True, a.tokens),))[("stream", a.concurrency)]
            finally:
                for s in servers.values():
                    s.stop()
            text = report(a, per, errors, machine, command)
    finally:
        load.close()
        shutil.rmtree(work, ignore_errors=True)
    print(text, end="")
    if a.out:
        a.out.write_text(text)
    return 1 if errors.get("swapper") else 0


def identical(ctx: Ctx, a: argparse.Namespace, machine: dict[str, str], command: str) -> str:
    """Three llama-servers started alike, measured in the same rotated, shuffled rounds."""
    model = synth(ctx.profile.overhead_mib, seed=1)
    names = ("llama-server 1", "llama-server 2", "llama-server 3")
    servers = {n: start_direct(ctx.layout, model, overhead.MODEL, ctx.dir(f"identical{i}"))
               for i, n in enumerate(names)}
    body = completion(overhead.MODEL, a.tokens, True)
    tps: dict[str, list[float]] = {n: [] for n in names}
    try:
        for s in servers.values():
            s.wait_healthy()
            for _ in range(2):
                ctx.loadgen.run(s.url, body, a.concurrency, a.concurrency)
        rng = ctx.rng(1)
        for r in range(a.rounds):
            for n in overhead.rotated(names, r, rng):
                reqs, wall = ctx.loadgen.run(servers[n].url, body, a.streams, a.concurrency)
                if any(q.status != 200 for q in reqs):
                    raise RuntimeError(f"{n}: a request failed:\n{servers[n].log_tail(10)}")
                tps[n].append(RunStats.of(reqs, wall).tokens_per_s)
    finally:
        for s in servers.values():
            s.stop()
    rng = random.Random(7)
    rows = []
    for x, y in (("llama-server 2", "llama-server 1"), ("llama-server 3", "llama-server 1"),
                 ("llama-server 3", "llama-server 2")):
        xs = [ratio(p, q) for p, q in zip(tps[x], tps[y])]
        lo, hi = interval(xs, rng)
        rows.append((f"{x} / {y}", f"{median(xs):.3f}", f"{lo:.3f}–{hi:.3f}",
                     f"{sum(v > 1 for v in xs)} of {len(xs)}"))
    return "\n\n".join([
        "# Streamed tokens/s: three llama-server processes started alike",
        f"Run on {dt.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')} with `{command}`: "
        f"{a.streams} streams of {a.tokens} tokens at concurrency {a.concurrency} per server and round, "
        f"{a.rounds} rounds in a rotated, then shuffled order; the same model, arguments and CPU for all three.",
        md_table(["machine", ""], list(machine.items())),
        md_table(["ratio of tokens/s", "median", "90% interval", "rounds above 1"], rows),
    ]) + "\n"


def report(a: argparse.Namespace, per: dict[str, list[RunStats]], errors: dict[str, list[str]],
           machine: dict[str, str], command: str) -> str:
    tps = {t: [s.tokens_per_s for s in runs] for t, runs in per.items()}
    own = {f: [ratio(x, y) for x, y in zip(tps[f], tps[e])] for f, e in overhead.OWN.items()}
    rel = [ratio(x, y) for x, y in zip(own["swapper"], own["router"])]
    raw = [ratio(x, y) for x, y in zip(tps["swapper"], tps["router"])]
    rng = random.Random(7)
    summary = []
    for name, xs in (("swapper ÷ its engine", own["swapper"]), ("router ÷ its engine", own["router"]),
                     ("swapper/router, each over its own engine", rel), ("swapper/router, raw", raw)):
        lo, hi = interval(xs, rng)
        summary.append((name, f"{median(xs):.3f}", f"{lo:.3f}–{hi:.3f}", f"{sum(x > 1 for x in xs)} of {len(xs)}"))
    rounds = [(i, *(f"{tps[t][i]:.0f}" for t in overhead.MEASURED), f"{rel[i]:.3f}", f"{raw[i]:.3f}")
              for i in range(len(rel))]
    failed = "; ".join(f"{t}: {len(e)} failed" for t, e in errors.items() if e) or "none"
    parts = [
        "# Streamed tokens/s: swapper against router mode, many rounds",
        f"Run on {dt.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')} with `{command}`: "
        f"{a.streams} streams of {a.tokens} tokens (`ignore_eos`) at concurrency {a.concurrency} per target and "
        f"round, {a.rounds} rounds, the five targets of bench/overhead.py in a rotated, then shuffled order "
        "(llama-server directly, swapper, router mode, and each front's own llama-server asked directly on its "
        "private port). Ratios are taken within a round; the interval is a bootstrap 90% interval of the median "
        "(rounds resampled).",
        md_table(["machine", ""], list(machine.items())),
        md_table(["ratio of tokens/s", "median", "90% interval", "rounds above 1"], summary),
        f"Failed requests: {failed}.",
        md_table(["round", *overhead.MEASURED, "swapper/router (own engines)", "swapper/router (raw)"], rounds),
    ]
    return "\n\n".join(parts) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
