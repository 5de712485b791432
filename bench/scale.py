"""3. Scale: listing a big models directory, and a thousand requests queued behind a cold swap.

Listing: N header-only GGUFs (a few KB each) in one folder; the catalog scan is timed in this
process (swapper's own `discover`), then a fresh swapper and a fresh router are started on the
folder and their first listing is timed. Queueing: swapper holds one small model and gets N
concurrent requests for another (its queue raised to take them all); every answer must be 200,
and the supervisor's RSS (the swapper process alone) is sampled throughout. Router mode gets
the same burst for comparison.
"""

from __future__ import annotations

import time
from pathlib import Path

import psutil

from .context import Ctx
from .driver import RunStats, completion
from .models import MiB, link_dir, many_headers, synth
from .procs import PeakSampler
from .report import Goal, Section, md_table
from .servers import Server, describe, http_get, start_router, start_swapper, swapper_config
from .stats import Spread, median



def _timed_get(server: Server, path: str) -> tuple[float, int, int]:
    """Seconds, status and body size of one GET."""
    t0 = time.perf_counter()
    status, body = http_get(server.port, path, 120)
    return time.perf_counter() - t0, status, len(body)


def listing(ctx: Ctx, folder: Path, count: int) -> tuple[list[tuple[str, str, str]], float, list[Server]]:
    from swapper.app import discover
    from swapper.config import Settings

    scans = []
    for _ in range(3):
        t0 = time.perf_counter()
        cat = discover(Settings(models_dir=str(folder)))
        scans.append(time.perf_counter() - t0)
    if len(cat) != count:
        raise RuntimeError(f"catalog found {len(cat)} models in {folder}, expected {count}")
    rows = [("swapper catalog scan (in process, median of 3)", f"{median(scans) * 1000:.0f} ms", f"{len(cat)} models")]
    d = ctx.dir("scale")
    servers = []
    first_list = 0.0
    for kind in ("swapper", "router"):
        t0 = time.perf_counter()
        if kind == "swapper":
            s = start_swapper(ctx.layout, d, swapper_config(ctx.layout), models_dir=folder)
        else:
            s = start_router(ctx.layout, folder, d, models_max=1)
        servers.append(s)
        try:
            s.wait_healthy(120)
            up = time.perf_counter() - t0
            path = "/v1/models" if kind == "swapper" else "/models"
            first, status, size = _timed_get(s, path)
            second, _, _ = _timed_get(s, path)
            n = len(s.get_json(path)["data"])
            if status != 200 or n != count:
                raise RuntimeError(f"{kind} listed {n} models (status {status}), expected {count}")
            rows.append((f"{kind}: start → healthy", f"{up * 1000:.0f} ms", ""))
            rows.append((f"{kind}: first GET {path}", f"{first * 1000:.0f} ms", f"{n} models, {size / 1024:.0f} KiB"))
            rows.append((f"{kind}: second GET {path}", f"{second * 1000:.0f} ms", ""))
            if kind == "swapper":
                first_list = median(scans) + first
        finally:
            s.stop()
    return rows, first_list, servers


def burst(ctx: Ctx, kind: str, n: int) -> tuple[tuple, Server, int, int]:
    """N concurrent requests for model b while a is resident (b must be swapped in first)."""
    d = ctx.dir("scale")
    files = {"a": synth(16, seed=1), "b": synth(16, seed=2)}
    if kind == "swapper":
        fp = 64 * MiB
        cfg = swapper_config(ctx.layout, files, {"a": fp, "b": fp})
        s = start_swapper(ctx.layout, d, cfg, "--budget", str(int(1.5 * fp)), "--queue-size", str(n + 10),
                          "--preload", "a")
    else:
        s = start_router(ctx.layout, link_dir(d / "burst-models", files), d, models_max=1)
    try:
        s.wait_healthy()
        warm, _ = ctx.loadgen.run(s.url, completion("a", 1, False), 1, 1)
        if warm[0].status != 200:
            raise RuntimeError(f"{kind}: model a did not answer: {warm[0].error}\n{s.log_tail()}")
        front = psutil.Process(s.proc.pid)
        sampler = PeakSampler(lambda: front.memory_info().rss, every=0.01)  # the front process alone
        base = front.memory_info().rss
        sampler.start()
        reqs, wall = ctx.loadgen.run(s.url, completion("b", 1, False), n, n)
        peak = sampler.stop()
        st = RunStats.of(reqs, wall)
        bad = [r for r in reqs if r.status != 200]
        kinds = sorted({f"{r.status} {(r.error or '')[:100]}" for r in bad})
        lat = Spread.of(r.latency for r in reqs if r.status == 200)
        row = (kind, f"{st.ok}/{n}", len(bad), f"{wall:.2f}", f"{lat.med:.2f} / {lat.hi:.2f}",
               f"{base / MiB:.0f}", f"{peak / MiB:.0f}", "; ".join(kinds[:2]))
        return row, s, peak, len(bad)
    finally:
        s.stop()


def run(ctx: Ctx) -> Section:
    p = ctx.profile
    folder = many_headers(ctx.dir(f"headers-{p.scale_files}"), p.scale_files)
    rows, first_list, servers = listing(ctx, folder, p.scale_files)
    ctx.log(f"scale: swapper scan + first listing of {p.scale_files} models {first_list:.2f} s")
    list_table = md_table(["listing", "time", ""], rows)
    burst_rows = []
    peak_sw, errors_sw = 0, -1
    for kind in ("swapper", "router"):
        row, s, peak, errors = burst(ctx, kind, p.scale_requests)
        servers.append(s)
        burst_rows.append(row)
        if kind == "swapper":
            peak_sw, errors_sw = peak, errors
        ctx.log(f"scale: {p.scale_requests} queued requests via {kind}: {row[1]} answered, "
                f"peak RSS {peak / MiB:.0f} MiB")
    burst_table = md_table(["target", "answered 200", "errors", "wall s", "latency p50 / max s",
                            "RSS before MiB", "peak RSS MiB", "error kinds"], burst_rows)
    sec = Section(
        "3. Scale",
        f"{p.scale_files} header-only GGUF files (valid llama metadata and vocabulary, {_size(folder)} each) in "
        f"one folder. Then {p.scale_requests} concurrent non-streaming requests (max_tokens 1) for model `b` "
        f"while `a` is resident and the budget (or `--models-max 1`) holds one: all wait for the swap. "
        f"RSS is the front process alone (swapper's supervisor, or the router), sampled every 10 ms.",
        [list_table, burst_table])
    sec.goals.append(Goal(f"list {p.scale_files} models (catalog scan + first /v1/models of a fresh swapper)", "< 1 s",
                          f"{first_list:.2f} s", first_list < 1.0))
    sec.goals.append(Goal(f"{p.scale_requests} requests queued behind a cold swap", "all 200, no error",
                          f"{p.scale_requests - errors_sw}/{p.scale_requests} answered 200", errors_sw == 0))
    sec.goals.append(Goal("peak supervisor RSS during that burst", "< 200 MiB", f"{peak_sw / MiB:.0f} MiB",
                          peak_sw < 200 * MiB))
    sec.commands += [describe(s) for s in servers]
    return sec


def _size(folder: Path) -> str:
    files = sorted(folder.glob("*.gguf"))
    return f"{files[0].stat().st_size / 1024:.1f} KB" if files else "?"
