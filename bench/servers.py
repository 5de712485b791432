"""The three ways of serving a model, started the same way: direct, swapper, router.

- direct: `llama-server -m FILE` (the floor for everything);
- swapper: `python -m swapper serve` (children are the same llama-server);
- router: `llama-server --models-dir DIR --models-max N`, llama.cpp's own router mode, same binary.

Every server (and, by inheritance, every child it starts) is pinned to the server CPUs, away
from the load generator, and gets the same engine arguments: context, slots, threads.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import yaml

from swapper.process import free_port

REPO = Path(__file__).resolve().parent.parent
CTX = 4096


def process_cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of a live process and all its threads, exited ones included.

    From the kernel's CPU clock of that process (`clock_getcpuclockid`, here computed as the
    kernel encodes it: a process's scheduler clock is `(~pid << 3) | 2`), to the nanosecond:
    /proc and psutil count in 10 ms ticks, which for a few dozen streams of ~3 ms each was a
    tenth of what was measured. Falls back to psutil where the clock cannot be read.
    """
    try:
        return time.clock_gettime((~pid << 3) | 2)
    except OSError:
        try:
            t = psutil.Process(pid).cpu_times()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            return float("nan")
        return t.user + t.system


def find_llama_server() -> str:
    """$SWAPPER_LLAMA_SERVER, PATH, or swapper's build cache (`make llama-server`)."""
    from swapper.engines import cached_llama_server

    env = os.environ.get("SWAPPER_LLAMA_SERVER")
    if env and Path(env).is_file():
        return env
    found = shutil.which("llama-server") or cached_llama_server(Path.home() / ".cache" / "swapper")
    if not found:
        raise SystemExit("llama-server not found: run `make llama-server` or set SWAPPER_LLAMA_SERVER")
    return str(found)


@dataclass
class Layout:
    """Which CPUs the servers and the client get, and the engine arguments every target shares."""

    server_cpus: set[int]
    client_cpus: set[int]
    binary: str

    @classmethod
    def detect(cls, binary: str, pin: bool = True) -> Layout:
        cpus = sorted(os.sched_getaffinity(0))
        if pin and len(cpus) >= 2:
            return cls(set(cpus[1:]), {cpus[0]}, binary)
        return cls(set(cpus), set(cpus), binary)

    @property
    def threads(self) -> int:
        return len(self.server_cpus)

    def engine_args(self, parallel: int = 1) -> list[str]:
        """What swapper passes its children, spelled out for direct and router mode."""
        return ["-c", str(CTX * parallel), "-np", str(parallel), "-ngl", "0", "--metrics",
                "-t", str(self.threads)]

    def pin_self(self) -> None:
        os.sched_setaffinity(0, self.client_cpus)

    def _preexec(self) -> Any:
        cpus = set(self.server_cpus)
        return lambda: os.sched_setaffinity(0, cpus)


@dataclass
class Server:
    """A running target: its process, port and log."""

    kind: str  # direct | swapper | router
    proc: subprocess.Popen
    port: int
    argv: list[str]
    log_path: Path
    health: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get_json(self, path: str, timeout: float = 30.0) -> Any:
        status, body = http_get(self.port, path, timeout)
        if status != 200:
            raise RuntimeError(f"{self.kind} GET {path}: {status} {body[:300]!r}")
        return json.loads(body)

    def wait_healthy(self, timeout: float = 60.0) -> float:
        """Seconds until the health route answered 200 (polled every 5 ms)."""
        t0 = time.perf_counter()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if http_get(self.port, self.health, 2.0)[0] == 200:
                    return time.perf_counter() - t0
            except OSError:
                pass
            if time.perf_counter() - t0 > timeout:
                raise RuntimeError(f"{self.kind} not healthy after {timeout}s:\n{self.log_tail()}")
            time.sleep(0.005)

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def engines(self) -> list[psutil.Process]:
        """llama-server processes below this server (its children, for swapper and router)."""
        out = []
        for p in self.descendants():
            try:
                if os.path.basename(p.exe()) == "llama-server":
                    out.append(p)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return out

    def engine_url(self) -> str:
        """The URL of the one llama-server this front runs, on its private port: the same engine
        process asked directly (bench/overhead.py measures each front against its own engine)."""
        found = self.engines()
        if len(found) != 1:
            raise RuntimeError(f"{self.kind}: {len(found)} engines running, expected one")
        argv = found[0].cmdline()
        return f"http://127.0.0.1:{int(argv[argv.index('--port') + 1])}"

    def cpu_seconds(self) -> float:
        """CPU time (user + system) of the server process alone, not its children."""
        return process_cpu_seconds(self.proc.pid)

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, timeout: float = 30.0) -> float:
        """SIGTERM and wait; whatever it left behind is killed by pid, and an engine it fronts
        (`start_floor`) is stopped too. Returns seconds taken."""
        kids = self.descendants()
        t0 = time.perf_counter()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        took = time.perf_counter() - t0
        _, alive = psutil.wait_procs(kids, timeout=10)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        if "engine" in self.extra:
            self.extra["engine"].stop(timeout)
        return took


def http_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request("GET", path)
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def http_post(port: int, path: str, body: dict[str, Any], timeout: float = 120.0) -> tuple[int, bytes]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def _spawn(layout: Layout, kind: str, argv: list[str], workdir: Path, health: str,
           env: dict[str, str] | None = None, port: int = 0, **extra: Any) -> Server:
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"{kind}-{port}.log"
    with open(log_path, "wb") as lf:
        proc = subprocess.Popen(argv, stdout=lf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=str(workdir), env={**os.environ, **(env or {})},
                                preexec_fn=layout._preexec())
    return Server(kind, proc, port, argv, log_path, health, dict(extra))


def start_direct(layout: Layout, model: Path, name: str, workdir: Path, parallel: int = 1) -> Server:
    port = free_port()
    argv = [layout.binary, "-m", str(model), "--host", "127.0.0.1", "--port", str(port), "--alias", name,
            *layout.engine_args(parallel)]
    return _spawn(layout, "direct", argv, workdir, "/health", port=port)


def start_router(layout: Layout, models_dir: Path, workdir: Path, models_max: int, parallel: int = 1) -> Server:
    port = free_port()
    argv = [layout.binary, "--models-dir", str(models_dir), "--models-max", str(models_max),
            "--host", "127.0.0.1", "--port", str(port), *layout.engine_args(parallel)]
    return _spawn(layout, "router", argv, workdir, "/health", port=port)


def start_floor(layout: Layout, engine: Server, workdir: Path) -> Server:
    """bench/relay_floor.py in front of `engine` (a direct llama-server), which it stops with."""
    port = free_port()
    argv = [sys.executable, str(REPO / "bench" / "relay_floor.py"), "--port", str(port),
            "--upstream-port", str(engine.port)]
    engine.wait_healthy()
    return _spawn(layout, "floor", argv, workdir, "/health", port=port, engine=engine)


def swapper_config(layout: Layout, models: dict[str, Path] | None = None,
                   footprints: dict[str, int] | None = None, parallel: int = 1) -> dict[str, Any]:
    """Config for `swapper serve`: children get the same threads as direct and router mode.

    Models may be declared with their footprint (measured beforehand), so that the first load
    plans with real bytes instead of the estimate's safety margin.
    """
    cfg: dict[str, Any] = {"defaults": {"args": ["-t", str(layout.threads)], "parallel": parallel,
                                        "ctx_size": CTX}}
    if models:
        cfg["models"] = {}
        for name, path in models.items():
            spec: dict[str, Any] = {"path": str(path)}
            if footprints and name in footprints:
                spec["footprint"] = int(footprints[name])
            cfg["models"][name] = spec
    return cfg


def start_swapper(layout: Layout, workdir: Path, config: dict[str, Any], *flags: str,
                  models_dir: Path | None = None) -> Server:
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    cfg_path = workdir / f"swapper-{port}.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    argv = [sys.executable, "-m", "swapper", "serve", "--port", str(port), "--device", "cpu",
            "--reserve", "0", "--state-dir", str(workdir / f"state-{port}"), "--config", str(cfg_path), *flags]
    if models_dir is not None:
        argv += ["--models-dir", str(models_dir)]
    # an explicit PYTHONPATH wins (to compare another swapper tree), else this repository's
    pypath = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH", ""), str(REPO)) if p)
    env = {"SWAPPER_LLAMA_SERVER": layout.binary, "SWAPPER_HF_CACHE": "0", "PYTHONPATH": pypath}
    return _spawn(layout, "swapper", argv, workdir, "/health/live", env=env, port=port,
                  config=yaml.safe_dump(config, default_flow_style=True, width=1 << 20).strip())


def describe(s: Server) -> str:
    """The command line a target ran with (and swapper's config file, inline)."""
    argv = ["python" if a == sys.executable else a for a in s.argv]  # not this machine's path
    text = " ".join(argv)
    if "config" in s.extra:
        text += f"   # config: {s.extra['config']}"
    return text
