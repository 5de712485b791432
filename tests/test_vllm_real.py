"""`swapper serve` over a real vLLM (CPU build, its own virtualenv) and a tiny local Llama.

`tests/vllm_setup.py` builds both once per machine (the session fixture calls it; CI calls it
first). Each test starts vLLM once (20-50 s here): start, chat, stream and stop; a crash of the
engine; a SIGKILL of swapper. Every one ends with no vLLM process (API server, engine core,
worker, keepers) and no socket file left behind.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import psutil
import pytest

import vllm_setup
from swapper.backends.vllm import estimate_parts

pytestmark = [pytest.mark.vllm, pytest.mark.real]


@pytest.fixture(scope="session")
def vllm_env() -> tuple[Path, Path]:
    return vllm_setup.ensure()


def config(vllm_env: tuple[Path, Path]) -> dict:
    py, model = vllm_env
    return {
        "engines": {"vllm": {"command": [str(py), "-m", "vllm.entrypoints.openai.api_server"],
                             "args": ["--dtype", "bfloat16", "--enforce-eager"]}},
        "models": {"tiny": {"path": str(model), "engine": "vllm", "ctx_size": 512, "aliases": ["small"],
                            "args": ["--kv-cache-memory-bytes", "67108864"]}},
    }


def catalog_entry(vllm_env: tuple[Path, Path]):  # noqa: ANN201
    from swapper.catalog import build_catalog
    from swapper.config import ModelSpec, Settings

    st = Settings()
    spec = config(vllm_env)["models"]["tiny"]
    st.models["tiny"] = ModelSpec(name="tiny", **spec)
    return build_catalog(st).get("tiny")


def tree(s) -> list[psutil.Process]:  # noqa: ANN001
    """Every process below swapper: keepers, API server, engine core, worker (whose titles and
    environment vLLM overwrites, so the tree is the only reliable way to find them)."""
    return [psutil.Process(p) for p in s.child_pids()]


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            continue
    return out


def env_of(pid: int, key: str) -> str:
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return next(e.split(b"=", 1)[1].decode() for e in env if e.startswith(key.encode() + b"="))


def api_server_pid(procs: list[psutil.Process]) -> int:
    for p in procs:
        if p.cmdline()[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]:
            return p.pid
    raise AssertionError(f"no vLLM API server among {procs}")


def sockets_left(state_dir: Path, alias: str) -> list[str]:
    left = [str(p) for p in (state_dir / "run").rglob("*") if p.is_socket()]
    if os.path.lexists(alias):
        left.append(alias)
    return left


def wait_gone(s, procs: list[psutil.Process], alias: str, timeout: float = 20.0) -> None:  # noqa: ANN001
    end = time.monotonic() + timeout
    while time.monotonic() < end and (alive(procs) or sockets_left(s.state_dir, alias)):
        time.sleep(0.2)
    assert not alive(procs), f"vLLM processes outlived their model: {alive(procs)}"
    assert not sockets_left(s.state_dir, alias), "socket files left behind"
    assert not list((s.state_dir / "run").iterdir()), "the child's workdir was not removed"


def load(s, openai_client) -> tuple[float, list[psutil.Process], str]:  # noqa: ANN001
    """Cold-start vLLM through a chat; returns seconds, its processes and its temp path."""
    client = openai_client(s, timeout=300)
    t0 = time.monotonic()
    out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}],
                                         max_tokens=8, temperature=0)
    took = time.monotonic() - t0
    assert out.model == "tiny" and out.usage.completion_tokens == 8
    procs = tree(s)
    alias = env_of(procs[0].pid, "TMPDIR")
    return took, procs, alias


def test_real_vllm_start_chat_stream_stop_and_rss_accounting(swapper_factory, vllm_env, openai_client):
    s = swapper_factory(config=config(vllm_env))
    assert s.status("tiny")["value"] == "unloaded"
    took, procs, alias = load(s, openai_client)
    print(f"vLLM cold start through swapper: {took:.1f}s")
    titles = " ".join(" ".join(p.cmdline()) for p in procs)
    assert "VLLM::EngineCore" in titles and "VLLM::Worker" in titles, titles
    client = openai_client(s, timeout=120)

    # the request names an alias: vLLM only answers to its served name, so swapper rewrites it
    comp = client.completions.create(model="small", prompt="one two", max_tokens=6, temperature=0)
    assert comp.model == "tiny" and comp.usage.completion_tokens == 6
    chunks = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "go"}],
                                                 max_tokens=16, temperature=0, stream=True))
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content is not None]) > 3
    models = {m["id"]: m for m in s.get("/v1/models").json()["data"]}
    assert models["tiny"]["owned_by"] == "vllm"

    # the ledger holds what the whole tree (API server, engine core, worker, keepers) uses
    st = s.status("tiny")
    pss = sum(p.memory_full_info().pss for p in alive(procs))
    estimate = sum(estimate_parts(catalog_entry(vllm_env), "host"))
    print(f"vLLM footprint: measured {st['footprint_bytes'] / 2**20:.0f} MiB, tree PSS now {pss / 2**20:.0f} MiB, "
          f"first estimate {estimate / 2**20:.0f} MiB")
    assert st["footprint_bytes"] > 500 << 20, "engine core and worker are part of the footprint"
    assert abs(st["footprint_bytes"] - pss) < 0.25 * pss
    assert st["reserved_bytes"] == st["footprint_bytes"], "the ledger holds the measured footprint"
    assert 0.7 * pss < estimate < 1.5 * pss, "the estimate before any load counts vLLM's runtime"

    t0 = time.monotonic()
    assert s.post("/models/unload", {"model": "tiny"}).status == 200
    s.wait_for(lambda: s.status("tiny")["value"] == "unloaded", 60, "unload")
    wait_gone(s, procs, alias)
    print(f"vLLM stop: {time.monotonic() - t0:.1f}s")


def test_real_vllm_engine_crash_leaves_no_process_or_socket(swapper_factory, vllm_env, openai_client):
    s = swapper_factory(config=config(vllm_env))
    _, procs, alias = load(s, openai_client)
    os.kill(api_server_pid(procs), signal.SIGKILL)  # its engine core and worker would live on
    # a crash of a loaded model is not a failed load: it is unloaded, with the engine's exit
    # status, and the next request reloads it
    s.wait_for(lambda: s.status("tiny")["exit_code"] is not None, 30, "the crash to be noticed")
    assert s.status("tiny")["value"] == "unloaded" and not s.status("tiny")["failed"]
    wait_gone(s, procs, alias)


def test_real_vllm_sigkill_of_swapper_leaves_no_process_or_socket(swapper_factory, vllm_env, openai_client):
    s = swapper_factory(config=config(vllm_env))
    _, procs, alias = load(s, openai_client)
    assert len(procs) >= 5, "outer keeper, inner keeper, API server, engine core, worker"
    s.proc.kill()
    s.proc.wait(10)
    wait_gone(s, procs, alias, timeout=30)
