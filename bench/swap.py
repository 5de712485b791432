"""2. Swap latency: a seeded request sequence over more models than fit, swapper vs router mode.

Swapper gets a byte budget that holds `k` models, router mode `--models-max k`; both evict the
least recently used model, so both see the same swaps. Each swap through swapper is split, from
its swap events (evict/load with durations) and the /proc start times of the keeper and the
engine, into: victim stop, child start (spawning the keeper, whose Python starts and forks the
engine), child ready (engine start to swapper seeing /health 200) and first token. The floor is
the same llama-server started and stopped by hand: victim stop + start to /health 200.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .context import Ctx
from .driver import Req, boot_offset, completion
from .models import MiB, link_dir, synth
from .procs import HandRun, engine_of, hand_run, start_boot
from .report import Goal, Section, md_table
from .servers import Server, describe, start_router, start_swapper, swapper_config
from .stats import Spread, lru_misses, median, ratio

KEEPER_ALLOWANCE = 16 * MiB  # the keeper's own PSS, counted in swapper's measured footprint


@dataclass
class SwapSample:
    """One request that needed a load, as one target served it."""

    model: str
    victim: str | None
    total: float  # request -> first token
    ready: float | None = None  # request -> child healthy (swapper's load event)
    spawn: float | None = None  # request -> engine forked
    phases: dict[str, float] = field(default_factory=dict)


@dataclass
class SeqResult:
    target: str
    total: float  # sum of all request latencies in the sequence
    swaps: list[SwapSample]
    loads: int
    errors: list[str]


def sequence(ctx: Ctx, names: list[str]) -> list[str]:
    rng = ctx.rng(2)
    seq = [rng.choice(names)]
    while len(seq) < ctx.profile.swap_requests:
        seq.append(rng.choice(names))
    return seq


def floor_runs(ctx: Ctx, files: dict[str, Any]) -> dict[str, list[HandRun]]:
    d = ctx.dir("swap")
    runs: dict[str, list[HandRun]] = {n: [] for n in files}
    for _ in range(ctx.profile.floor_reps):
        for n, f in files.items():
            runs[n].append(hand_run(ctx.layout, f, n, d))
    return runs


def _new_events(server: Server, seen: set[tuple[float, str, str]]) -> list[dict[str, Any]]:
    evs = server.get_json("/api/status")["events"][::-1]  # oldest first
    out = []
    for e in evs:
        key = (e["time"], e["model"], e["action"])
        if key not in seen:
            seen.add(key)
            out.append(e)
    return out


def _swapper_sample(server: Server, req: Req, model: str, victim: str | None,
                    events: list[dict[str, Any]], offset: float) -> SwapSample:
    """Split one swap through swapper into its phases (boot-clock times throughout)."""
    t0 = req.t_send
    first = t0 + (req.ttft or req.latency)
    s = SwapSample(model, victim, first - t0)
    load = next((e for e in events if e["action"] == "load" and e["model"] == model), None)
    evict = next((e for e in events if e["action"] == "evict" and e["model"] == victim), None) if victim else None
    eng = engine_of(server, model)
    engine_start = start_boot(eng.pid) if eng else None
    if load is None or engine_start is None:
        return s
    ready = load["time"] - offset
    stop_end = t0
    if evict is not None:
        stop_end = evict["time"] - offset
        s.phases["victim stop"] = evict["seconds"]
        s.phases["before stop"] = max(0.0, stop_end - evict["seconds"] - t0)
    s.ready = ready - t0
    s.spawn = engine_start - t0
    s.phases["child start"] = engine_start - stop_end
    s.phases["child ready"] = ready - engine_start
    s.phases["first token"] = first - ready
    return s


def run_sequence(ctx: Ctx, server: Server, seq: list[str], k: int) -> SeqResult:
    lg = ctx.loadgen
    misses = dict(lru_misses(seq, k))
    seen: set[tuple[float, str, str]] = set()
    if server.kind == "swapper":
        _new_events(server, seen)
    offset = boot_offset()
    total = 0.0
    swaps: list[SwapSample] = []
    errors: list[str] = []
    loads = 0
    for i, model in enumerate(seq):
        reqs, _ = lg.groups(server.url, [[completion(model, 8, True)]])
        r = reqs[0]
        total += r.latency
        if r.status != 200:
            errors.append(f"{r.status} {(r.error or '')[:160]}")
            continue
        if server.kind == "swapper":
            evs = _new_events(server, seen)
            loads += sum(1 for e in evs if e["action"] == "load")
        if i not in misses:
            continue
        if server.kind == "swapper":
            swaps.append(_swapper_sample(server, r, model, misses[i], evs, offset))
        else:
            s = SwapSample(model, misses[i], r.ttft or r.latency)
            eng = engine_of(server, model)
            start = start_boot(eng.pid) if eng else None
            if start is not None:
                s.spawn = start - r.t_send
            swaps.append(s)
    if server.kind == "router":
        loads = server.log_path.read_text(errors="replace").count("spawning server instance with name=")
    return SeqResult(server.kind, total, swaps, loads, errors)


def run(ctx: Ctx) -> Section:
    p = ctx.profile
    k = p.swap_resident
    names = [f"m{i + 1}" for i in range(p.swap_models)]
    files = {n: synth(p.swap_mib, seed=20 + i) for i, n in enumerate(names)}
    d = ctx.dir("swap")
    models_dir = link_dir(d / "models", files)
    floors = floor_runs(ctx, files)
    ctx.log("swap floor: start " + ", ".join(f"{n} {median(r.start_s for r in floors[n]) * 1000:.0f} ms"
                                             for n in names))
    footprint = {n: int(median(r.pss for r in floors[n])) + KEEPER_ALLOWANCE for n in names}
    budget = int((k + 0.5) * max(footprint.values()))
    seq = sequence(ctx, names)
    results: dict[str, list[SeqResult]] = {"swapper": [], "router": []}
    servers: dict[str, Server] = {}
    for rep in range(p.swap_reps):
        for target in (("swapper", "router") if rep % 2 == 0 else ("router", "swapper")):
            if target == "swapper":
                cfg = swapper_config(ctx.layout, files, footprint)
                s = start_swapper(ctx.layout, d, cfg, "--budget", str(budget))
            else:
                s = start_router(ctx.layout, models_dir, d, models_max=k)
            servers[target] = s
            try:
                s.wait_healthy()
                results[target].append(run_sequence(ctx, s, seq, k))
            finally:
                s.stop()
        ctx.log(f"swap rep {rep + 1}: sequence seconds " + ", ".join(
            f"{t} {results[t][-1].total:.2f}" for t in results))
    return _section(ctx, names, files, floors, footprint, budget, seq, results, servers)


def _floor(floors: dict[str, list[HandRun]], s: SwapSample) -> float:
    start = median(r.start_s for r in floors[s.model])
    stop = median(r.stop_s for r in floors[s.victim]) if s.victim else 0.0
    return start + stop


def _section(ctx: Ctx, names: list[str], files: dict[str, Any], floors: dict[str, list[HandRun]],
             footprint: dict[str, int], budget: int, seq: list[str],
             results: dict[str, list[SeqResult]], servers: dict[str, Server]) -> Section:
    p = ctx.profile
    k = p.swap_resident
    ms = 1000.0
    floor_rows = [(n, f"{files[n].stat().st_size / MiB:.0f}", Spread.of(r.start_s * ms for r in floors[n]).fmt(0),
                   Spread.of(r.first_token_s * ms for r in floors[n]).fmt(0),
                   Spread.of(r.stop_s * ms for r in floors[n]).fmt(1), f"{footprint[n] / MiB:.0f}")
                  for n in names]
    floor_table = md_table(["model", "file MiB", "start → /health 200 ms", "start → first token ms",
                            "SIGTERM → exit ms", "footprint MiB (PSS + keeper)"], floor_rows)

    sw = [s for r in results["swapper"] for s in r.swaps if s.victim]
    ro = [s for r in results["router"] for s in r.swaps if s.victim]
    phase_names = ["before stop", "victim stop", "child start", "child ready", "first token"]
    rows = []
    for ph in phase_names:
        rows.append((ph, Spread.of(s.phases[ph] * ms for s in sw if ph in s.phases).fmt(1), "", ""))
    rows.append(("**request → first token**", Spread.of(s.total * ms for s in sw).fmt(1),
                 Spread.of(s.total * ms for s in ro).fmt(1), ""))
    rows.append(("request → engine forked", Spread.of(s.spawn * ms for s in sw if s.spawn is not None).fmt(1),
                 Spread.of(s.spawn * ms for s in ro if s.spawn is not None).fmt(1), "(victim stopped by then)"))
    rows.append(("floor: victim stop + start by hand", Spread.of(_floor(floors, s) * ms for s in sw).fmt(1),
                 Spread.of(_floor(floors, s) * ms for s in ro).fmt(1), ""))
    over_sw = Spread.of((s.total - _floor(floors, s)) * ms for s in sw)
    over_ro = Spread.of((s.total - _floor(floors, s)) * ms for s in ro)
    rows.append(("**first token − floor**", over_sw.fmt(1), over_ro.fmt(1), "goal: swapper < 100 ms"))
    swap_table = md_table(["per swap (ms, median (min–max) over swaps)", "swapper", "router", ""], rows)

    pairs = list(zip(results["swapper"], results["router"]))
    seq_ratio = Spread.of(ratio(a.total, b.total) for a, b in pairs)
    seq_rows = [(t, Spread.of(r.total for r in results[t]).fmt(2, " s"), Spread.of(r.loads for r in results[t]).fmt(0),
                 sum(len(r.errors) for r in results[t])) for t in ("swapper", "router")]
    expected = len(lru_misses(seq, k))
    seq_table = md_table(["target", "sequence total (sum of latencies)", f"loads (LRU predicts {expected})",
                          "errors"], seq_rows)

    sec = Section(
        "2. Swap latency",
        f"{len(names)} synthetic models of {p.swap_mib} MiB; swapper `--budget {budget / MiB:.0f}MiB` "
        f"(holds {k}: {k + 0.5:g} x the largest footprint, declared in its config), router `--models-max {k}`. "
        f"Sequence ({len(seq)} streamed requests, max_tokens 8, seed {ctx.seed}): `{' '.join(seq)}`; "
        f"{p.swap_reps} repetitions, swapper and router alternating, a fresh server each time. "
        f"Phases of a swap through swapper: *before stop* = request → victim told to stop; *victim stop* = "
        f"its evict event; *child start* = victim gone → engine forked (swapper spawns its keeper, a Python "
        f"process, which forks llama-server); *child ready* = engine forked → swapper saw /health 200 (its load "
        f"event); *first token* = load event → first streamed token at the client. Boundaries taken from /proc "
        f"start times have a resolution of 10 ms. Hand starts poll /health every 2 ms.",
        ["Floor (llama-server started and stopped by hand, same arguments and CPU):", floor_table,
         "Swaps (a cold first load is not a swap and is left out):", swap_table,
         f"Whole sequence, median (min–max) over repetitions; swapper/router = {seq_ratio.fmt(3)}:", seq_table])
    sec.goals.append(Goal("swap: request → first token within 100 ms of the floor", "< 100 ms",
                          over_sw.fmt(1, " ms"), over_sw.med < 100 if over_sw.n else None))
    sec.goals.append(Goal("swap sequence total vs router mode", "<= 1.0x", seq_ratio.fmt(3, "x"),
                          seq_ratio.med <= 1.0 if seq_ratio.n else None))
    errs = {t: [e for r in results[t] for e in r.errors] for t in results}
    for t, es in errs.items():
        if es:
            sec.notes.append(f"{t}: {len(es)} requests failed: " + "; ".join(f"`{e}`" for e in sorted(set(es))[:3]))
    sec.commands += [describe(s) for s in servers.values()]
    return sec
