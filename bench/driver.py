"""The orchestrator's handle on the load generator process, and what its records mean.

The load generator is a separate process (bench/loadgen.py) pinned to the client CPUs; this
module sends it commands and turns its raw per-request records into the numbers reported.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .stats import percentile

LOADGEN = Path(__file__).with_name("loadgen.py")


@dataclass(frozen=True)
class Req:
    """One request as the load generator saw it."""

    status: int
    t_send: float  # CLOCK_BOOTTIME seconds
    ttft: float | None
    latency: float
    tokens: int
    error: str | None


@dataclass(frozen=True)
class RunStats:
    """A batch of requests summarised: latency percentiles, first token, throughput."""

    n: int
    ok: int
    p50_ms: float
    p99_ms: float
    ttft_p50_ms: float
    tokens_per_s: float
    req_per_s: float
    cpu_ms: float = float("nan")  # CPU of the front process per request, when known

    @classmethod
    def of(cls, reqs: list[Req], wall: float, cpu_ms: float = float("nan")) -> RunStats:
        good = [r for r in reqs if r.status == 200]
        lat = [r.latency * 1000 for r in good]
        ttft = [r.ttft * 1000 for r in good if r.ttft is not None]
        tokens = sum(r.tokens for r in good)
        return cls(len(reqs), len(good), percentile(lat, 50), percentile(lat, 99), percentile(ttft, 50),
                   tokens / wall if wall > 0 else 0.0, len(good) / wall if wall > 0 else 0.0, cpu_ms)


class LoadGen:
    """A long-lived load generator process; one command at a time."""

    def __init__(self, cpus: set[int], timeout: float = 600.0):
        argv = [sys.executable, str(LOADGEN), "--timeout", str(timeout)]
        if cpus:
            argv += ["--cpus", ",".join(str(c) for c in sorted(cpus))]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)

    def _call(self, cmd: dict[str, Any]) -> tuple[list[Req], float]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"load generator exited with {self.proc.wait()}")
        doc = json.loads(line)
        return [Req(*r) for r in doc["records"]], float(doc["wall"])

    def run(self, url: str, body: dict[str, Any], n: int, concurrency: int,
            path: str = "/v1/completions", pooled: bool = False) -> tuple[list[Req], float]:
        """`pooled`: streams keep their connections where the server does (loadgen.py)."""
        return self._call({"op": "run", "url": url, "path": path, "body": body, "n": n,
                           "concurrency": concurrency, "pooled": pooled})

    def groups(self, url: str, groups: list[list[dict[str, Any]]],
               path: str = "/v1/completions") -> tuple[list[Req], float]:
        return self._call({"op": "groups", "url": url, "path": path, "groups": groups})

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(5)


def completion(model: str, max_tokens: int, stream: bool, prompt: str = "Once upon a time") -> dict[str, Any]:
    """A completion that always generates exactly `max_tokens` (random weights may pick EOS)."""
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": stream, "ignore_eos": True}


def boot_offset() -> float:
    """time.time() - CLOCK_BOOTTIME: turns wall-clock event times into boot-clock times."""
    a = time.time()
    b = time.clock_gettime(time.CLOCK_BOOTTIME)
    c = time.time()
    return (a + c) / 2 - b
