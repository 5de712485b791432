#!/usr/bin/env python3
"""Benchmarks: swapper against llama-server directly and llama.cpp's router mode, in one run.

    python bench/run.py --quick [--out bench/RESULTS.md]   CPU version (a few minutes)
    python bench/run.py [--out bench/RESULTS-full.md]      the whole matrix
    python bench/run.py --quick --smoke                     a tiny variant (under a minute)

Sections: 1 proxy overhead, 2 swap latency, 3 scale, 4 budget fidelity, 5 page cache cold vs
warm (`--only 1,3` picks some). Prints markdown tables of ratios measured in the same run and,
with --out, writes them with the date, the machine and the exact commands.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import shlex
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.context import PROFILES, Ctx  # noqa: E402
from bench.driver import LoadGen  # noqa: E402
from bench.machine import describe, loadavg  # noqa: E402
from bench.report import Section, goals_table, md_table  # noqa: E402
from bench.servers import Layout, find_llama_server  # noqa: E402

SECTIONS = {"1": "overhead", "2": "swap", "3": "scale", "4": "fidelity", "5": "pagecache"}
TITLES = {"1": "1. Proxy overhead", "2": "2. Swap latency", "3": "3. Scale", "4": "4. Budget fidelity",
          "5": "5. Page cache: cold vs warm"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CPU version: tiny models, concurrency 1 and 8")
    ap.add_argument("--smoke", action="store_true", help="with --quick: the smallest run that exercises everything")
    ap.add_argument("--only", default="1,2,3,4,5", help="comma-separated sections to run (default all)")
    ap.add_argument("--out", type=Path, help="write the report (markdown) here")
    ap.add_argument("--workdir", type=Path, help="logs and scratch files (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the workdir (server logs) afterwards")
    ap.add_argument("--no-pin", action="store_true", help="do not pin the load generator away from the servers")
    ap.add_argument("--seed", type=int, default=7, help="seed of every request sequence")
    return ap.parse_args(argv)


def render(ctx: Ctx, sections: list[Section], machine: dict[str, str], command: str,
           load_before: str, load_after: str, seconds: float) -> str:
    lay = ctx.layout
    pinning = (f"load generator and orchestrator on CPU {sorted(lay.client_cpus)}, every server and its "
               f"children on CPU {sorted(lay.server_cpus)} (llama-server `-t {lay.threads}`)"
               if lay.client_cpus != lay.server_cpus else "not pinned (one CPU, or --no-pin)")
    head = [
        f"# swapper benchmarks ({ctx.profile.name})",
        f"Run on {dt.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}, {seconds / 60:.1f} minutes, "
        f"with `{command}`.",
        md_table(["machine", ""], [(k, v) for k, v in machine.items()] + [
            ("load average (1/5/15 min) before", load_before),
            ("load average after", f"{load_after} (the scale section's burst counts too: router mode runs "
                                   "a thread per connection)"),
            ("pinning", pinning)]),
    ]
    if machine.get("GPU", "none") == "none":
        head.append("No GPU on this machine: the issue's GPU table (CUDA llama-server, 0.5–6 GiB models) "
                    "cannot be produced here; every number below is CPU-only. The machine is shared "
                    "(2 cores), so absolute times are noisy; the ratios are measured within one run, with the "
                    "targets interleaved, and are the numbers to read.")
    body = ["## Goals", goals_table(sections)] + [s.markdown() for s in sections]
    cmds = ["## Exact commands", f"    {command}"]
    for s in sections:
        for c in s.commands:
            cmds.append(f"    {c}")
    return "\n\n".join(head + body + ["\n".join(cmds[:1]) + "\n\n" + "\n".join(cmds[1:])]) + "\n"


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    profile = PROFILES["smoke" if a.smoke else "quick" if a.quick else "full"]
    binary = find_llama_server()
    layout = Layout.detect(binary, pin=not a.no_pin)
    layout.pin_self()
    workdir = a.workdir or Path(tempfile.mkdtemp(prefix="swapper-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    args = argv if argv is not None else sys.argv[1:]
    command = " ".join(["python", "bench/run.py", *(shlex.quote(x) for x in args)])
    machine = describe(binary)
    load_before = loadavg()
    t0 = time.monotonic()
    lg = LoadGen(layout.client_cpus)
    ctx = Ctx(profile, layout, lg, workdir, seed=a.seed)
    sections: list[Section] = []
    failed = False
    try:
        for key in [k.strip() for k in a.only.split(",") if k.strip()]:
            ctx.log(f"section {TITLES[key]}")
            try:
                section: Callable[[Ctx], Section] = importlib.import_module(f"bench.{SECTIONS[key]}").run
                sections.append(section(ctx))
            except Exception as e:  # one broken section still leaves the others' numbers
                failed = True
                traceback.print_exc()
                sections.append(Section(TITLES[key], f"**Failed:** `{e.__class__.__name__}: {str(e)[:2000]}`"))
    finally:
        lg.close()
        if not a.keep and a.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    text = render(ctx, sections, machine, command, load_before, loadavg(), time.monotonic() - t0)
    print(text, end="")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text)
        ctx.log(f"wrote {a.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
