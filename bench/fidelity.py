"""4. Budget fidelity: a random workload over three models with room for two.

The same seeded workload (groups of 1-3 concurrent requests) goes to swapper with a byte budget
of 2.5 footprints and to router mode with `--models-max 2`. A sampler adds up the PSS of every
process below the front process (engines, and swapper's keepers) every 20 ms: the peak over the
budget must stay <= 1.0. Loads are counted (swapper's swap events, router's spawn log lines) and
compared with the fewest possible for that workload, computed offline (stats.fewest_loads).
"""

from __future__ import annotations


from .context import Ctx
from .driver import completion
from .models import MiB, link_dir, synth
from .procs import PeakSampler, hand_run, pss
from .report import Goal, Section, md_table
from .servers import Server, describe, start_router, start_swapper, swapper_config
from .stats import belady_loads, fewest_loads, lru_misses, median
from .swap import KEEPER_ALLOWANCE

NAMES = ("f1", "f2", "f3")



def workload(ctx: Ctx) -> list[list[str]]:
    rng = ctx.rng(4)
    groups: list[list[str]] = []
    left = ctx.profile.fidelity_requests
    while left > 0:
        size = min(left, rng.choice([1, 1, 2, 3]))
        groups.append([rng.choice(NAMES) for _ in range(size)])
        left -= size
    return groups


def run_one(ctx: Ctx, server: Server, groups: list[list[str]]) -> tuple[int, int, int, list[str]]:
    """Peak PSS, loads, sampler samples and errors for the workload on one server."""
    server.wait_healthy()
    # PSS of everything below the front process (engines, and swapper's keepers)
    sampler = PeakSampler(lambda: pss(server.descendants()), every=0.02)
    sampler.start()
    try:
        bodies = [[completion(m, 4, False) for m in g] for g in groups]
        reqs, _ = ctx.loadgen.groups(server.url, bodies)
    finally:
        peak = sampler.stop()
    errors = [f"{r.status} {(r.error or '')[:120]}" for r in reqs if r.status != 200]
    if server.kind == "swapper":
        events = server.get_json("/api/status")["events"]
        loads = sum(1 for e in events if e["action"] == "load")
        if len(events) >= 50:  # the status page keeps the last 50: fall back on the log
            loads = server.log_path.read_text(errors="replace").count("swap load ")
    else:
        loads = server.log_path.read_text(errors="replace").count("spawning server instance with name=")
    return peak, loads, sampler.samples, errors


def run(ctx: Ctx) -> Section:
    p = ctx.profile
    d = ctx.dir("fidelity")
    files = {n: synth(p.fidelity_mib, seed=40 + i) for i, n in enumerate(NAMES)}
    hand = {n: hand_run(ctx.layout, f, n, d) for n, f in files.items()}
    footprint = {n: hand[n].pss + KEEPER_ALLOWANCE for n in NAMES}
    budget = int(2.5 * max(footprint.values()))
    groups = workload(ctx)
    flat = [m for g in groups for m in g]
    best = fewest_loads(groups, 2)
    rows = []
    servers = []
    peak_ratio = {}
    loads_of = {}
    for kind in ("swapper", "router"):
        if kind == "swapper":
            s = start_swapper(ctx.layout, d, swapper_config(ctx.layout, files, footprint), "--budget", str(budget),
                              "--queue-timeout", "300s")
        else:
            s = start_router(ctx.layout, link_dir(d / "models", files), d, models_max=2)
        servers.append(s)
        try:
            peak, loads, samples, errors = run_one(ctx, s, groups)
        finally:
            s.stop()
        peak_ratio[kind] = peak / budget
        loads_of[kind] = loads
        rows.append((kind, f"{peak / MiB:.0f}", f"{peak / budget:.3f}", loads, f"{loads / best:.2f}", samples,
                     len(errors), "; ".join(sorted(set(errors))[:2])))
        ctx.log(f"fidelity {kind}: peak/budget {peak / budget:.3f}, loads {loads} (fewest {best})")
    table = md_table(["target", "peak PSS MiB", "peak / budget", "loads", "loads / fewest", "samples",
                      "errors", "error kinds"], rows)
    sec = Section(
        "4. Budget fidelity",
        f"Three synthetic models of {p.fidelity_mib} MiB (footprint by hand: "
        f"{median(footprint.values()) / MiB:.0f} MiB with the keeper); budget {budget / MiB:.0f} MiB = 2.5 "
        f"footprints (router: `--models-max 2`, which counts models and knows no budget; its peak is shown "
        f"against the same bytes). Workload: {len(flat)} requests in {len(groups)} groups of 1–3 concurrent "
        f"requests (seed {ctx.seed}). Fewest loads possible for it: {best} (exact optimum, each group served "
        f"in its best order; Belady's MIN for the order as sent: {belady_loads(flat, 2)}; plain LRU for the order "
        f"as sent: {len(lru_misses(flat, 2))}).",
        [table])
    sec.goals.append(Goal("max resident memory / budget (swapper)", "<= 1.0", f"{peak_ratio['swapper']:.3f}",
                          peak_ratio["swapper"] <= 1.0))
    sec.goals.append(Goal("loads vs the fewest possible (swapper)", "report", f"{loads_of['swapper']} vs {best} "
                          f"(router {loads_of['router']})", None))
    sec.commands += [describe(s) for s in servers]
    return sec
