"""What every section shares: the run profile, CPU layout, load generator and scratch space."""

from __future__ import annotations

import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .driver import LoadGen
from .servers import Layout


@dataclass(frozen=True)
class Profile:
    """How much of each measurement a run does (quick for `make bench`, full for the matrix)."""

    name: str
    concurrency: tuple[int, ...] = (1, 8)
    # Twelve: a front's share of a request is a few percent of the core it shares with the engine,
    # so swapper and router mode differ by about one repetition's noise (±2-5%), and each is also
    # measured against its own engine (bench/overhead.py), a ratio of two noisy runs more.
    reps: int = 12
    short_requests: tuple[tuple[int, int], ...] = ((1, 60), (8, 96), (32, 128))  # concurrency -> requests
    stream_requests: tuple[tuple[int, int], ...] = ((1, 6), (8, 16), (32, 64))
    overhead_mib: int = 16
    cpu_concurrency: tuple[int, ...] = (1, 8, 32)  # the CPU-per-request table
    cpu_reps: int = 9  # rounds, each target once per round
    cpu_short: int = 70  # requests per target and round
    cpu_streams: int = 22  # streams per target and round (at least the concurrency)
    cpu_stream_tokens: int = 64
    swap_models: int = 3
    swap_mib: int = 64
    swap_resident: int = 1
    swap_requests: int = 12
    swap_reps: int = 2
    floor_reps: int = 5
    scale_files: int = 1000
    scale_requests: int = 1000
    fidelity_mib: int = 128
    fidelity_requests: int = 60
    cache_mib: int = 256
    cache_reps: int = 3

    def requests(self, stream: bool, concurrency: int) -> int:
        table = dict(self.stream_requests if stream else self.short_requests)
        return table.get(concurrency, max(table.values()))


PROFILES = {
    "quick": Profile("quick"),
    "full": Profile("full", concurrency=(1, 8, 32), reps=15,
                    short_requests=((1, 60), (8, 96), (32, 192)),
                    stream_requests=((1, 10), (8, 32), (32, 64)), swap_models=4, swap_mib=256, swap_resident=2,
                    swap_requests=24, swap_reps=3, fidelity_mib=256, cache_mib=1024, cache_reps=5),
    "smoke": Profile("smoke", concurrency=(1,), reps=2, short_requests=((1, 10),), stream_requests=((1, 3),),
                     cpu_concurrency=(1, 8), cpu_reps=1, cpu_short=10, cpu_streams=2, cpu_stream_tokens=8,
                     swap_requests=4, swap_reps=1, floor_reps=2, scale_files=100, scale_requests=100,
                     fidelity_mib=64, fidelity_requests=12, cache_mib=64, cache_reps=1),
}


@dataclass
class Ctx:
    profile: Profile
    layout: Layout
    loadgen: LoadGen
    workdir: Path
    seed: int = 7
    started: float = field(default_factory=time.monotonic)

    def rng(self, salt: int = 0) -> random.Random:
        return random.Random(self.seed * 1000 + salt)

    def log(self, msg: str) -> None:
        print(f"[{time.monotonic() - self.started:6.1f}s] {msg}", file=sys.stderr, flush=True)

    def dir(self, name: str) -> Path:
        d = self.workdir / name
        d.mkdir(parents=True, exist_ok=True)
        return d
