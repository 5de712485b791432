"""Process facts read from /proc: when a process started, on the kernel's boot clock.

/proc/PID/stat's start time is in clock ticks since boot (10 ms here), on the same clock as
CLOCK_BOOTTIME, so it lines up with the load generator's send times without any wall-clock
conversion. Memory is PSS (proportional set size): shared pages are split between the processes
that map them, so summing it over processes does not count a page twice.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import psutil

from .servers import Layout, Server, free_port, http_get, http_post

TICK = 1.0 / os.sysconf("SC_CLK_TCK")


def start_boot(pid: int) -> float | None:
    """When `pid` was forked, in CLOCK_BOOTTIME seconds (resolution: one clock tick)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    rest = stat[stat.rfind(b")") + 2:].split()
    return int(rest[19]) * TICK  # field 22 of stat; rest starts at field 3


def engine_of(server: Server, model: str) -> psutil.Process | None:
    """The llama-server below `server` that serves `model` (matched by its --alias)."""
    for p in server.engines():
        try:
            cmd = p.cmdline()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if "--alias" in cmd and cmd[cmd.index("--alias") + 1] == model:
            return p
    return None


def pss(procs: list[psutil.Process]) -> int:
    total = 0
    for p in procs:
        try:
            total += p.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return total


class PeakSampler(threading.Thread):
    """The peak of `measure()` sampled every few milliseconds in the background (0 = gone)."""

    def __init__(self, measure: Callable[[], int], every: float):
        super().__init__(daemon=True)
        self.measure = measure
        self.every = every
        self.peak = 0
        self.samples = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                self.peak = max(self.peak, self.measure())
            except psutil.NoSuchProcess:
                return
            self.samples += 1
            time.sleep(self.every)

    def stop(self) -> int:
        self.done.set()
        self.join(10)
        return self.peak


@dataclass
class HandRun:
    """Starting and stopping one llama-server by hand: the floor a router cannot beat."""

    start_s: float  # spawn -> /health 200
    first_token_s: float  # spawn -> first token of a 1-token completion
    stop_s: float  # SIGTERM -> exit
    pss: int  # after one request


def hand_run(layout: Layout, model: Path, name: str, workdir: Path, poll: float = 0.002) -> HandRun:
    """Start the same llama-server a router would (same arguments and CPUs), time it, stop it."""
    port = free_port()
    argv = [layout.binary, "-m", str(model), "--host", "127.0.0.1", "--port", str(port), "--alias", name,
            *layout.engine_args()]
    cpus = set(layout.server_cpus)
    with open(workdir / f"hand-{name}.log", "ab") as lf:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=lf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                preexec_fn=lambda: os.sched_setaffinity(0, cpus))
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"llama-server exited with {proc.returncode} (see {workdir}/hand-{name}.log)")
            try:
                if http_get(port, "/health", 2.0)[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(poll)
        started = time.perf_counter() - t0
        status, _ = http_post(port, "/v1/completions", {"prompt": "hi", "max_tokens": 1, "temperature": 0})
        first = time.perf_counter() - t0
        if status != 200:
            raise RuntimeError(f"llama-server answered {status}")
        mem = pss([psutil.Process(proc.pid)])
        t1 = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        stopped = time.perf_counter() - t1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    return HandRun(started, first, stopped, mem)
