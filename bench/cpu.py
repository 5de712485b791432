"""Part of section 1: CPU per request of each front, at concurrency 1, 8 and 32, targets interleaved.

On a CPU-only host the front shares the cores with generation, so what it spends per request
(and per streamed token) is the cost to compare with llama.cpp's own router. CPU time (user +
system) is read from each process's kernel CPU clock, to the nanosecond (servers.py,
`process_cpu_seconds`): the front is the server process alone (swapper's supervisor, router
mode's router, every thread of it); the engine is everything below it (swapper's keeper and
llama-server, the router's llama-server child), or llama-server itself when it is served
directly. Totals over every round are divided by the requests of every round. The ratio of the
fronts is taken within each round (the targets run back to back, in rotated order) and shown
as its median over the rounds, with their range: on a shared machine a neighbour's burst lands
on one round, not on one target's total.

Streams are measured twice. First with a connection per stream for every target, as a client
must with llama-server served directly (it closes the connection after a stream without saying
so). Then from a pooled client, as OpenAI's SDK is: it keeps a connection wherever the server
does. Swapper keeps the client's connection across streams; router mode answers a stream with
`Connection: close`, so each of its streams costs a new connection, as it does for its users;
llama-server served directly gets a new connection per stream in both (a pooled client's next
request would find it closed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .context import Ctx
from .driver import completion
from .report import Goal, md_table
from .servers import Server, process_cpu_seconds
from .stats import Spread, ratio

TARGETS = ("direct", "swapper", "router")
FRONTS = ("swapper", "router")


@dataclass
class Tally:
    """CPU seconds and work done, summed over rounds; and the front's CPU per request in each."""

    front: float = 0.0
    engine: float = 0.0
    requests: int = 0
    tokens: int = 0
    failed: int = 0
    rounds: list[float] = field(default_factory=list)

    def per_request_ms(self, what: str) -> float:
        v = self.front if what == "front" else self.front + self.engine
        return v * 1000 / self.requests if self.requests else math.nan

    def per_token_us(self) -> float:
        return self.front * 1e6 / self.tokens if self.tokens else math.nan


def engine_seconds(server: Server) -> float:
    """CPU of the processes that generate: the children of a front, or a direct llama-server."""
    pids = [server.proc.pid] if server.kind == "direct" else [p.pid for p in server.descendants()]
    total = 0.0
    for pid in pids:
        t = process_cpu_seconds(pid)
        if t == t:  # not NaN: the process is still there
            total += t
    return total


def measure(ctx: Ctx, servers: dict[str, Server], model: str) -> dict[tuple[str, int], dict[str, Tally]]:
    p = ctx.profile
    out: dict[tuple[str, int], dict[str, Tally]] = {}
    for wl, stream, tokens, pooled in (("short", False, 8, False), ("stream", True, p.cpu_stream_tokens, False),
                                       ("stream, pooled", True, p.cpu_stream_tokens, True)):
        body = completion(model, tokens, stream)
        for c in p.cpu_concurrency:
            n = max(c, p.cpu_streams) if stream else p.cpu_short
            per = out[(wl, c)] = {t: Tally() for t in TARGETS}
            for rnd in range(p.cpu_reps):
                for t in TARGETS[rnd % 3:] + TARGETS[:rnd % 3]:
                    s = servers[t]
                    f0, e0 = s.cpu_seconds(), engine_seconds(s)
                    reqs, _ = ctx.loadgen.run(s.url, body, n, c, pooled=pooled and t != "direct")
                    f1, e1 = s.cpu_seconds(), engine_seconds(s)
                    tally = per[t]
                    if t == "direct":
                        tally.engine += f1 - f0  # the server is the engine
                    else:
                        tally.front += f1 - f0
                        tally.engine += e1 - e0
                    tally.requests += len(reqs)
                    tally.rounds.append((f1 - f0) / len(reqs) if reqs else math.nan)
                    # ignore_eos: every answer relays exactly max_tokens tokens (some of random
                    # weights' tokens carry no text, so counting text events would undercount)
                    tally.tokens += tokens * sum(1 for r in reqs if r.status == 200)
                    tally.failed += sum(1 for r in reqs if r.status != 200)
            ctx.log(f"cpu {wl} c={c}: front ms/request " + ", ".join(
                f"{t} {per[t].per_request_ms('front'):.2f}" for t in FRONTS))
    return out


def table(ctx: Ctx, results: dict[tuple[str, int], dict[str, Tally]]) -> tuple[str, list[Goal]]:
    p = ctx.profile
    rows = []
    worse: list[str] = []
    for (wl, c), per in results.items():
        units = [("ms/request", lambda t: t.per_request_ms("front"))]
        if wl.startswith("stream"):
            units.append(("µs/token", Tally.per_token_us))
        # a round's ratio is the same per request and per token (every stream has as many tokens)
        r = Spread.of(ratio(a, b) for a, b in zip(per["swapper"].rounds, per["router"].rounds))
        if r.med > 1.0:
            worse.append(f"{wl} c={c} {r.med:.2f}x")
        for unit, fn in units:
            sw, ro = fn(per["swapper"]), fn(per["router"])
            totals = [per[t].per_request_ms("total") for t in TARGETS] if unit == "ms/request" else ["", "", ""]
            rows.append((wl, c, unit, f"{sw:.2f}", f"{ro:.2f}", r.fmt(2),
                         *(f"{v:.2f}" if v != "" else "–" for v in totals)))
    failed = {t: sum(per[t].failed for per in results.values()) for t in TARGETS}
    text = md_table(["workload", "conc.", "unit", "front: swapper", "front: router", "swapper/router (rounds)",
                     "total ms/request: direct", "total: swapper", "total: router"], rows)
    intro = (f"CPU per request at concurrency {', '.join(map(str, p.cpu_concurrency))}: {p.cpu_short} short "
             f"requests (max_tokens 8) and max(concurrency, {p.cpu_streams}) streamed ones "
             f"(max_tokens {p.cpu_stream_tokens}) per target and round, {p.cpu_reps} rounds with the targets "
             f"rotated; swapper/router is the median of the rounds' ratios (and their range). *stream*: a new "
             f"connection per stream; *stream, pooled*: a client that keeps its connection wherever the server "
             f"does, as OpenAI's SDK does. *front* = the server process alone (swapper's supervisor, router mode's "
             f"router); *total* = front + engine (every process below it, or llama-server itself when served "
             f"directly), so total − direct is what a front costs the machine, its extra hop included."
             + (f" Failed requests: {failed}." if any(failed.values()) else ""))
    goal = Goal("front CPU per request and per streamed token vs router's (c=" + "/".join(
        map(str, p.cpu_concurrency)) + ", median of rounds)", "<= 1.0x everywhere", "; ".join(worse) or "all <= 1.0x",
        not worse)
    return intro + "\n\n" + text, [goal]
