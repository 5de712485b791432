"""1. Proxy overhead: the same model served directly, through swapper and through router mode.

Short non-streaming completions (8 tokens) and streamed ones (128 tokens) at each concurrency.
Every repetition runs the targets back to back in a rotated, shuffled order (each front next to
its own engine, below), so drift on a shared machine touches all of them alike; ratios are taken
within a repetition and reported as median (min–max) over repetitions.

Why each front is also measured against its own engine: two llama-server processes started the
same way generate at speeds up to ~3% apart for their whole lives (three identical ones, same
model and arguments, measured in interleaved rounds), about what a front costs a stream. So
besides the direct server, each front's own child is asked directly on its private port in the
same rounds, and front ÷ own engine is what the front itself costs, free of which process
happened to be the faster; the goals are judged on it.
"""

from __future__ import annotations

import math
import random
from typing import Callable, Sequence, TypeVar

from . import cpu as cpu_table
from .context import Ctx
from .driver import Req, RunStats, completion
from .models import link_dir, synth
from .report import Goal, Section, md_table
from .servers import Server, describe, start_direct, start_router, start_swapper, swapper_config
from .stats import Spread, ratio

TARGETS = ("direct", "swapper", "router")
OWN = {"swapper": "swapper's engine", "router": "router's engine"}  # each front's child, asked directly
MEASURED = TARGETS + tuple(OWN.values())
WORKLOADS = (("short", False, 8), ("stream", True, 128))
MODEL = "tiny"
T = TypeVar("T")

Metric = tuple[str, Callable[[RunStats], float], bool]  # label, value, higher is better
METRICS: list[Metric] = [
    ("p50 latency ms", lambda s: s.p50_ms, False),
    ("p99 latency ms", lambda s: s.p99_ms, False),
    ("p50 first token ms", lambda s: s.ttft_p50_ms, False),
    ("tokens/s", lambda s: s.tokens_per_s, True),
    ("requests/s", lambda s: s.req_per_s, True),
    ("proxy CPU ms/request", lambda s: s.cpu_ms, False),
]


def _check(reqs: list[Req], target: str, server: Server, errors: dict[str, list[str]]) -> None:
    """Failed requests are counted and reported; only a target that answers nothing stops the run."""
    bad = [r for r in reqs if r.status != 200]
    errors.setdefault(target, []).extend(f"{r.status} {(r.error or '')[:160]}" for r in bad)
    if bad and len(bad) == len(reqs):
        raise RuntimeError(f"{target}: all {len(reqs)} requests failed, first: {bad[0].status} "
                           f"{bad[0].error}\n{server.log_tail(10)}")


Results = dict[tuple[str, int], dict[str, list[RunStats]]]


def rotated(items: Sequence[T], rep: int, rng: random.Random) -> list[T]:
    """Repetition `rep`'s order of `items`: rotated for the first len(items) repetitions (each
    item once in each place), then shuffled."""
    k = rep % len(items)
    out = list(items[k:]) + list(items[:k])
    if rep >= len(items):
        rng.shuffle(out)
    return out


def _order(rep: int, rng: random.Random) -> list[str]:
    """A repetition's order: direct, and each front with its own engine right before or after it
    (their ratio is the one the goals read, so no other run comes between them); the three
    blocks rotated, then shuffled, and each pair's order alternated, then drawn."""
    blocks = rotated([["direct"]] + [[f, e] for f, e in OWN.items()], rep, rng)
    for b in blocks:
        if (rep % 2 if rep < len(blocks) else rng.random() < 0.5):
            b.reverse()
    return [t for b in blocks for t in b]


def measure(ctx: Ctx, servers: dict[str, Server], errors: dict[str, list[str]],
            workloads: tuple[tuple[str, bool, int], ...] = WORKLOADS) -> Results:
    p = ctx.profile
    lg = ctx.loadgen
    for t, s in servers.items():  # warm up: load, fill caches, open keep-alive connections
        for _ in range(2):
            for wl, stream, tokens in WORKLOADS:
                reqs, wall = lg.run(s.url, completion(MODEL, tokens, stream), 10 if not stream else 3, 1)
                _check(reqs, t, s, {})
    urls = {t: s.url for t, s in servers.items()} | {e: servers[f].engine_url() for f, e in OWN.items()}
    engines = {f: [e.pid for e in servers[f].engines()] for f in OWN}
    front = {t: servers[t] for t in TARGETS} | {e: servers[f] for f, e in OWN.items()}
    out: Results = {}
    rng = ctx.rng(1)
    for wl, stream, tokens in workloads:
        for c in p.concurrency:
            n = p.requests(stream, c)
            body = completion(MODEL, tokens, stream)
            per: dict[str, list[RunStats]] = {t: [] for t in MEASURED}
            for rep in range(p.reps):
                for t in _order(rep, rng):
                    cpu0 = front[t].cpu_seconds()
                    reqs, wall = lg.run(urls[t], body, n, c)
                    cpu = (front[t].cpu_seconds() - cpu0) * 1000 / max(1, len(reqs))
                    _check(reqs, t, front[t], errors)
                    per[t].append(RunStats.of(reqs, wall, cpu_ms=cpu if t in OWN else math.nan))
            out[(wl, c)] = per
            ctx.log(f"overhead {wl} c={c}: p50 ms " + ", ".join(
                f"{t} {Spread.of(s.p50_ms for s in per[t]).med:.2f}" for t in MEASURED))
    for f in OWN:  # a front that restarted its engine would have compared two processes
        if [e.pid for e in servers[f].engines()] != engines[f]:
            raise RuntimeError(f"{f} restarted its engine during the run")
    return out


def start(ctx: Ctx) -> dict[str, Server]:
    """The three targets over one synthetic model, healthy."""
    d = ctx.dir("overhead")
    model = synth(ctx.profile.overhead_mib, seed=1)
    models_dir = link_dir(d / "models", {MODEL: model})
    layout = ctx.layout
    servers = {
        "direct": start_direct(layout, model, MODEL, d),
        "swapper": start_swapper(layout, d, swapper_config(layout), models_dir=models_dir),
        "router": start_router(layout, models_dir, d, models_max=1),
    }
    try:
        for s in servers.values():
            s.wait_healthy()
    except BaseException:
        for s in servers.values():
            s.stop()
        raise
    return servers


def run(ctx: Ctx) -> Section:
    servers = start(ctx)
    model_bytes = synth(ctx.profile.overhead_mib, seed=1).stat().st_size
    errors: dict[str, list[str]] = {}
    try:
        results = measure(ctx, servers, errors)
        cpu = cpu_table.measure(ctx, servers, MODEL)
    finally:
        for s in servers.values():
            s.stop()
    sec = _section(ctx, results, servers, model_bytes, errors)
    text, goals = cpu_table.table(ctx, cpu)
    sec.tables.append(text)
    sec.goals += goals
    return sec


def _per_rep(per: dict[str, list[RunStats]], fn: Callable[[RunStats], float], a: str, b: str) -> list[float]:
    return [ratio(fn(x), fn(y)) for x, y in zip(per[a], per[b])]


def _own(per: dict[str, list[RunStats]], fn: Callable[[RunStats], float]) -> tuple[Spread, Spread, Spread]:
    """Each front over its own engine, and swapper's ratio over router mode's, per repetition."""
    sw = _per_rep(per, fn, "swapper", OWN["swapper"])
    ro = _per_rep(per, fn, "router", OWN["router"])
    return Spread.of(sw), Spread.of(ro), Spread.of(ratio(a, b) for a, b in zip(sw, ro))


def _worse(worse: list[str], wl: str, c: int, label: str, higher: bool, s: Spread) -> None:
    if (higher and s.med < 1.0) or (not higher and s.med > 1.0):
        worse.append(f"{wl} c={c} {label} {s.med:.3f}")


def _section(ctx: Ctx, results: Results, servers: dict[str, Server], model_bytes: int,
             errors: dict[str, list[str]]) -> Section:
    p = ctx.profile
    rows, own_rows = [], []
    worst_stream = worst_stream_raw = math.inf
    router_worse: list[str] = []
    router_worse_raw: list[str] = []
    for (wl, c), per in results.items():
        for label, fn, higher in METRICS:
            if wl == "short" and "first token" in label:
                continue  # the whole answer is the first token
            vals = {t: Spread.of(fn(s) for s in per[t]) for t in TARGETS}
            sd = Spread.of(_per_rep(per, fn, "swapper", "direct"))
            sr = Spread.of(_per_rep(per, fn, "swapper", "router"))
            digits = 0 if vals["direct"].med >= 100 else 2
            if "proxy CPU" in label:  # the front process alone: swapper, or router mode's router
                # CPU time comes in 10 ms clock ticks: totals over all repetitions, not per-run medians
                cpu = {t: sum(s.cpu_ms * s.n for s in per[t]) / max(1, sum(s.n for s in per[t])) for t in TARGETS}
                rows.append((wl, c, label + " (all runs)", "–", f"{cpu['swapper']:.2f}", f"{cpu['router']:.2f}", "–",
                             f"{ratio(cpu['swapper'], cpu['router']):.2f}"))
                continue
            rows.append((wl, c, label, *(f"{vals[t].med:.{digits}f}" for t in TARGETS), sd.fmt(3), sr.fmt(3)))
            if label not in ("p50 latency ms", "tokens/s"):
                continue
            osw, oro, orel = _own(per, fn)
            own_rows.append((wl, c, label, osw.fmt(3), oro.fmt(3), orel.fmt(3)))
            _worse(router_worse, wl, c, label, higher, orel)
            _worse(router_worse_raw, wl, c, label, higher, sr)
            if wl == "stream" and label == "tokens/s":
                worst_stream = min(worst_stream, osw.med)
                worst_stream_raw = min(worst_stream_raw, sd.med)
    table = md_table(["workload", "conc.", "metric", "direct", "swapper", "router", "swapper/direct",
                      "swapper/router"], rows)
    own_table = md_table(["workload", "conc.", "metric", "swapper ÷ its engine", "router ÷ its engine",
                          "swapper/router"], own_rows)

    added_rows = []
    added_short = added_short_router = Spread.of([])
    for wl, _, _ in WORKLOADS:
        per = results.get((wl, 1))
        if not per:
            continue
        diff = {f: Spread.of(a.p50_ms - b.p50_ms for a, b in zip(per[f], per[e])) for f, e in OWN.items()}
        raw = {f: Spread.of(a.p50_ms - b.p50_ms for a, b in zip(per[f], per["direct"])) for f in OWN}
        added_rows.append((wl, diff["swapper"].fmt(2), diff["router"].fmt(2), raw["swapper"].fmt(2),
                           raw["router"].fmt(2)))
        if wl == "short":
            added_short, added_short_router = diff["swapper"], diff["router"]
    added = md_table(["workload (concurrency 1)", "swapper − its engine, p50 ms", "router − its engine, p50 ms",
                      "swapper − direct", "router − direct"], added_rows)

    sec = Section(
        "1. Proxy overhead",
        f"One synthetic llama model ({model_bytes / (1 << 20):.0f} MiB F16, random weights) served three ways, "
        f"and each front's own engine (its llama-server child) asked directly on its private port in the same "
        f"rounds. `short` = non-streaming, max_tokens 8; `stream` = streamed, max_tokens 128 (`ignore_eos`, so "
        f"every answer has exactly that many tokens). Each cell is the median over {p.reps} repetitions; "
        f"ratios are taken within a repetition and shown as median (min–max). For latencies a ratio below 1 favours "
        f"swapper, for tokens/s and requests/s a ratio above 1 does. Requests per run: "
        + ", ".join(f"c={c}: {p.requests(False, c)} short / {p.requests(True, c)} streamed" for c in p.concurrency)
        + ". p99 of a few dozen requests is close to their maximum.",
        [table,
         "Each front against its own engine: front ÷ the same llama-server process asked directly, per "
         "repetition, and swapper's ratio over router mode's. Two llama-server processes started alike can "
         "generate up to ~3% apart for their whole lives, about what a front costs a stream, so the goals "
         "are judged here; swapper/direct and swapper/router above compare different engine processes.",
         own_table,
         "Added latency at concurrency 1 (per repetition, then median (min–max)):", added])
    sec.goals.append(Goal("p50 added latency over its own engine, concurrency 1 (short)", "< 1 ms",
                          added_short.fmt(2, " ms") + f"; router mode {added_short_router.fmt(2, ' ms')}",
                          added_short.med < 1.0 if added_short.n else None))
    sec.goals.append(Goal("streamed tokens/s over its own engine (worst concurrency)", ">= 0.97x",
                          f"{worst_stream:.3f}x" if worst_stream < math.inf else "n/a",
                          worst_stream >= 0.97 if worst_stream < math.inf else None))
    sec.goals.append(Goal("never slower than router mode, each over its own engine (p50 latency, tokens/s)",
                          "every ratio favours swapper", "; ".join(router_worse) or "all favour swapper",
                          not router_worse))
    sec.goals.append(Goal("the two above across separate engine processes (swapper/direct, swapper/router)",
                          "report", f"streams vs direct {worst_stream_raw:.3f}x (worst); router mode: "
                          + ("; ".join(router_worse_raw) or "all favour swapper"), None))
    sec.notes.append("Every front (swapper, router mode's router) and the engine share the server CPU, as "
                     "they would on a CPU-only host: CPU a front spends per request (its own process, children "
                     "excluded) is taken from generation, which is why it is reported.")
    total = {t: sum(s.n for per in results.values() for s in per[t]) for t in MEASURED}
    failed = {t: len(errors.get(t, [])) for t in MEASURED}
    sec.goals.append(Goal("every measured request answered 200", "0 errors",
                          ", ".join(f"{t} {failed[t]}/{total[t]}" for t in TARGETS), failed["swapper"] == 0))
    for t in MEASURED:
        if failed[t]:
            kinds = sorted(set(errors[t]))
            sec.notes.append(f"{t}: {failed[t]} of {total[t]} requests failed (excluded from the numbers): "
                             + "; ".join(f"`{k}`" for k in kinds[:3]))
    sec.commands += [describe(s) for s in servers.values()]
    return sec
