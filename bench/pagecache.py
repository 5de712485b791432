"""5. Page cache: starting a model whose file is cold vs warm, and swaps with prefetch on vs off.

Cold = the file's pages dropped with posix_fadvise(DONTNEED) (swapper.prefetch.dontneed) and
fincore (util-linux) showing nothing resident just before the start. llama-server maps the file,
so a cold start pays for the reads both before /health turns 200 and at the first token; both
are reported. For prefetch, two swappers (`--prefetch true` / `false`, separate copies of the
files so one's cache state cannot help the other) swap between two models, each incoming file
made cold just before its request.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .context import Ctx
from .driver import completion
from .models import CACHE, MiB, evict_from_page_cache, fsync, synth
from .procs import hand_run
from .report import Goal, Section, md_table
from .servers import Server, describe, start_swapper, swapper_config
from .stats import Spread, median, ratio
from .swap import KEEPER_ALLOWANCE


def copy_of(src: Path, tag: str) -> Path:
    dst = CACHE / f"{src.stem}-{tag}.gguf"
    if not dst.exists():
        tmp = dst.with_suffix(".tmp")
        shutil.copyfile(src, tmp)
        fsync(tmp)
        tmp.rename(dst)
    return dst


def cold(path: Path) -> int | None:
    """Drop `path` from the page cache; raise if fincore still sees much of it resident."""
    left = evict_from_page_cache(path)
    if left is not None and left > path.stat().st_size // 100:
        raise RuntimeError(f"{path} still has {left} bytes in the page cache after DONTNEED")
    return left


def start_times(ctx: Ctx, model: Path) -> tuple[list[tuple[str, str, str]], float, float, list[int | None]]:
    d = ctx.dir("pagecache")
    runs: dict[str, list] = {"cold": [], "warm": []}
    seen: list[int | None] = []
    for _ in range(ctx.profile.cache_reps):
        seen.append(cold(model))
        runs["cold"].append(hand_run(ctx.layout, model, "pc", d))
        runs["warm"].append(hand_run(ctx.layout, model, "pc", d))
    rows = []
    for state in ("cold", "warm"):
        rows.append((state, Spread.of(r.start_s * 1000 for r in runs[state]).fmt(0),
                     Spread.of(r.first_token_s * 1000 for r in runs[state]).fmt(0)))
    c = median(r.first_token_s for r in runs["cold"])
    w = median(r.first_token_s for r in runs["warm"])
    return rows, c, w, seen


def prefetch_swaps(ctx: Ctx, src: Path) -> tuple[list[tuple[str, str, str, str]], dict[str, float], list[Server]]:
    """Cold swaps through a swapper with prefetch on and one with it off, interleaved."""
    d = ctx.dir("pagecache")
    other = synth(ctx.profile.cache_mib, seed=61)
    servers: dict[str, Server] = {}
    files: dict[str, dict[str, Path]] = {}
    for mode in ("on", "off"):
        files[mode] = {"x": copy_of(src, f"pf-{mode}"), "y": copy_of(other, f"pf-{mode}")}
        fp = hand_run(ctx.layout, files[mode]["x"], "x", d).pss + KEEPER_ALLOWANCE
        cfg = swapper_config(ctx.layout, files[mode], {"x": fp, "y": fp})
        servers[mode] = start_swapper(ctx.layout, d, cfg, "--budget", str(int(1.5 * fp)),
                                      "--prefetch", "true" if mode == "on" else "false")
    ttft: dict[str, list[float]] = {"on": [], "off": []}
    load: dict[str, list[float]] = {"on": [], "off": []}
    try:
        for s in servers.values():
            s.wait_healthy()
        for mode, s in servers.items():  # load x (cold or not, unmeasured)
            ctx.loadgen.run(s.url, completion("x", 1, False), 1, 1)
        for rep in range(ctx.profile.cache_reps):
            incoming = "y" if rep % 2 == 0 else "x"
            for mode in (("on", "off") if rep % 2 == 0 else ("off", "on")):
                s = servers[mode]
                cold(files[mode][incoming])
                reqs, _ = ctx.loadgen.groups(s.url, [[completion(incoming, 8, True)]])
                r = reqs[0]
                if r.status != 200:
                    raise RuntimeError(f"prefetch {mode}: {r.status} {r.error}\n{s.log_tail()}")
                ttft[mode].append(r.ttft or r.latency)
                ev = next((e for e in s.get_json("/api/status")["events"]
                           if e["action"] == "load" and e["model"] == incoming), None)
                if ev is not None:
                    load[mode].append(ev["seconds"])
    finally:
        for s in servers.values():
            s.stop()
    rows = [(f"prefetch {mode}", Spread.of(x * 1000 for x in ttft[mode]).fmt(0),
             Spread.of(x * 1000 for x in load[mode]).fmt(0), str(len(ttft[mode])))
            for mode in ("on", "off")]
    meds = {m: median(ttft[m]) for m in ttft}
    return rows, meds, list(servers.values())


def run(ctx: Ctx) -> Section:
    p = ctx.profile
    model = synth(p.cache_mib, seed=60)
    rows, c, w, seen = start_times(ctx, model)
    ctx.log(f"pagecache: start to first token cold {c * 1000:.0f} ms, warm {w * 1000:.0f} ms")
    pf_rows, meds, servers = prefetch_swaps(ctx, model)
    ctx.log(f"pagecache: cold swap first token prefetch on {meds['on'] * 1000:.0f} ms, off {meds['off'] * 1000:.0f} ms")
    left = [x for x in seen if x is not None]
    fincore = (f"fincore showed {max(left)} bytes resident after each DONTNEED (of "
               f"{model.stat().st_size / MiB:.0f} MiB)" if left else "fincore unavailable: cold state not confirmed")
    sec = Section(
        "5. Page cache: cold vs warm",
        f"One synthetic model of {p.cache_mib} MiB started by hand, {p.cache_reps} times cold and warm, "
        f"alternating; {fincore}. Model files here are small and the disk is fast (the GPU machine's "
        f"calibration saw 1.1–5.0 s cold vs 0.4–1.1 s warm for 4 MiB–5.4 GiB files); this is what was measured.",
        [md_table(["page cache", "start → /health 200 ms", "start → first token ms"], rows),
         f"Cold swaps through swapper (the victim stops while the incoming file is read ahead when prefetch is "
         f"on); prefetch on/off first-token ratio {ratio(meds['on'], meds['off']):.3f}:",
         md_table(["swapper", "request → first token ms", "load event ms (claim → ready)", "swaps"], pf_rows)])
    sec.goals.append(Goal("cold vs warm start (to first token)", "report", f"{c * 1000:.0f} ms vs {w * 1000:.0f} ms "
                          f"({ratio(c, w):.2f}x)", None))
    sec.goals.append(Goal("cold swap with prefetch on vs off", "report", f"{meds['on'] * 1000:.0f} ms vs "
                          f"{meds['off'] * 1000:.0f} ms ({ratio(meds['on'], meds['off']):.2f}x)", None))
    sec.commands += [describe(s) for s in servers]
    return sec
