"""Sleep mode as a warm tier: the scheduler's rules with fakes, then a real swapper over a fake vLLM.

vLLM's sleep mode only exists on CUDA, so the engine side is `fake_vllm.py`, which implements
vLLM's `/sleep`, `/wake_up` and `/is_sleeping` with CUDA's semantics (device memory freed at level
1, a generation request while asleep is an error) and logs every event it sees.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from conftest import alive
from fake_vllm import hf_folder
from schedfakes import FakeInstance, FakeLauncher, MiB, world
from swapper.catalog import ModelEntry

FAKE = str(Path(__file__).with_name("fake_vllm.py"))


# ------------------------------------------------------------------------- scheduler rules


@dataclass
class SleepyLauncher(FakeLauncher):
    """Records which engines are asleep; wakes can be held open by the test."""

    asleep: set[int] = field(default_factory=set)
    hold_wake: bool = False
    wake_gate: asyncio.Future | None = None
    fail_sleep: bool = False

    async def sleep(self, instance: FakeInstance, entry: ModelEntry) -> None:
        if self.fail_sleep:
            raise RuntimeError("POST /sleep answered 500")
        await super().sleep(instance, entry)
        self.asleep.add(instance.pid)

    async def wake(self, instance: FakeInstance, entry: ModelEntry) -> None:
        if self.hold_wake:
            self.wake_gate = asyncio.get_running_loop().create_future()
            await self.wake_gate
        await super().wake(instance, entry)
        self.asleep.discard(instance.pid)


def sleepy_world(sizes: dict[str, int], capacity: int, sleepable: set[str], **cfg: object):  # noqa: ANN201
    w = world(sizes, capacity, sleepable=sleepable, **cfg)
    w.launcher = SleepyLauncher(w.probe, footprints=dict(sizes), sleepable=set(sleepable))
    w.sched.launcher = w.launcher
    return w


async def use(w, name: str, seen: list | None = None) -> None:  # noqa: ANN001
    async with w.sched.acquire(name) as lease:
        if seen is not None:
            seen.append((name, lease.instance.pid, lease.instance.pid in w.launcher.asleep))


async def test_sleeping_model_frees_device_budget_and_holds_host_budget():
    w = sleepy_world({"a": 600 * MiB, "b": 600 * MiB}, capacity=1000 * MiB, sleepable={"a"},
                     host_budget=_size(2000 * MiB))
    await use(w, "a")
    await use(w, "b")
    await w.sched.settle()
    a = w.sched.models["a"]
    assert w.state("a") == "sleeping" and w.state("b") == "ready"
    assert w.launcher.sleeps == ["a"] and "a" not in w.launcher.stops, "slept, not killed"
    assert a.reserved == 0 and a.host_reserved == 600 * MiB
    assert w.sched.ledger_used() == 600 * MiB, "only b holds device budget"
    assert w.sched.host_used() == 600 * MiB
    assert w.probe.memory().used == 600 * MiB, "the engine released its device memory"


async def test_wake_beats_cold_start_and_no_request_reaches_a_sleeping_engine():
    w = sleepy_world({"a": 600 * MiB, "b": 600 * MiB}, capacity=1000 * MiB, sleepable={"a", "b"},
                     host_budget=_size(4000 * MiB))
    seen: list = []
    await use(w, "a", seen)
    await use(w, "b", seen)  # a sleeps
    await w.sched.settle()
    first_pid = seen[0][1]
    w.launcher.hold_wake = True
    req = asyncio.ensure_future(use(w, "a", seen))
    await w.spin()
    assert w.state("a") == "waking" and w.state("b") == "sleeping", "b made room by sleeping in turn"
    assert not req.done() and len(seen) == 2, "no lease while the engine is still waking"
    w.launcher.wake_gate.set_result(None)
    await req
    assert seen[-1] == ("a", first_pid, False), "the same process, awake before the request reached it"
    assert w.launcher.starts == ["a", "b"], "a was woken, not cold-started"
    assert w.launcher.wakes == ["a"]
    assert all(not asleep for _, _, asleep in seen)
    assert [e.action for e in w.sched.events if e.model == "a"] == ["load", "sleep", "wake"]


async def test_host_budget_overflow_stops_the_lru_sleeper():
    sizes = {"a": 600 * MiB, "b": 600 * MiB, "c": 600 * MiB}
    w = sleepy_world(sizes, capacity=1000 * MiB, sleepable=set(sizes), host_budget=_size(1000 * MiB))
    for name in ("a", "b", "c"):
        await use(w, name)
        await w.sched.settle()
    assert w.launcher.sleeps == ["a", "b"]
    assert w.launcher.stops == ["a"], "two sleepers exceed the host budget: the older one stops for real"
    assert (w.state("a"), w.state("b"), w.state("c")) == ("unloaded", "sleeping", "ready")
    assert w.sched.host_used() == 600 * MiB <= w.sched.host_capacity


async def test_a_failed_sleep_stops_the_engine_instead():
    w = sleepy_world({"a": 600 * MiB, "b": 600 * MiB}, capacity=1000 * MiB, sleepable={"a"},
                     host_budget=_size(4000 * MiB))
    w.launcher.fail_sleep = True
    await use(w, "a")
    await use(w, "b")
    await w.sched.settle()
    assert w.state("a") == "unloaded" and w.launcher.stops == ["a"]
    assert w.sched.host_used() == 0


def _size(n: int):  # noqa: ANN202
    from swapper.units import SizeSpec

    return SizeSpec(bytes=n)


# ---------------------------------------------------------------- a real swapper, fake vLLM


def events(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def fake_config(tmp_path: Path, names: list[str], sleep: bool = True, serve_form: bool = False) -> dict:
    root = tmp_path / "hf"
    command = [sys.executable, FAKE, "serve"] if serve_form else [sys.executable, FAKE]
    models = {n: {"path": str(hf_folder(root, n)), "engine": "vllm", "sleep": sleep} for n in names}
    return {"engines": {"vllm": {"command": command, "args": ["--enforce-eager"]}}, "models": models}


def fake_env(tmp_path: Path, **kw: str) -> dict[str, str]:
    env = {"FAKE_VLLM_EVENTS": str(tmp_path / "events.jsonl"), "FAKE_VLLM_WEIGHTS_MIB": "48",
           "FAKE_VLLM_START_SECONDS": "1.5", "FAKE_VLLM_WAKE_SECONDS": "0.05"}
    env.update(kw)
    return env


def chat(client, model: str, n: int = 4) -> str:  # noqa: ANN001
    out = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=n)
    return out.choices[0].message.content


def test_fake_vllm_sleeps_on_eviction_and_wakes_on_request(swapper_factory, tmp_path, openai_client):
    s = swapper_factory("--max-models", "1", "--host-budget", "4GiB",
                        config=fake_config(tmp_path, ["a", "b"]), env=fake_env(tmp_path))
    client = openai_client(s)
    log = tmp_path / "events.jsonl"
    t0 = time.monotonic()
    assert chat(client, "a") == "t0 t1 t2 t3"
    cold = time.monotonic() - t0
    start = next(e for e in events(log) if e["event"] == "start" and e["model"] == "a")
    assert "--enable-sleep-mode" in start["argv"] and start["env"]["VLLM_SERVER_DEV_MODE"] == "1"
    a_pid = start["pid"]

    chat(client, "b")  # max-models 1: a goes to sleep instead of stopping
    assert s.status("a")["value"] == "sleeping"
    assert s.status("b")["value"] == "loaded"
    data = {m["id"]: m for m in s.get("/v1/models").json()["data"]}
    assert data["a"]["status"]["value"] == "sleeping"
    assert any(e["event"] == "sleep" and e["model"] == "a" and e["level"] == 1 for e in events(log))

    t0 = time.monotonic()
    chat(client, "a")
    woke_in = time.monotonic() - t0
    assert s.status("a")["value"] == "loaded" and s.status("b")["value"] == "sleeping"
    ev = [e for e in events(log) if e["model"] == "a"]
    assert [e["event"] for e in ev if e["event"] in ("start", "wake")] == ["start", "wake"], "woken, not restarted"
    assert all(e["pid"] == a_pid for e in ev)
    assert woke_in < cold / 2, f"a wake ({woke_in:.2f}s) must beat a cold start ({cold:.2f}s)"
    wake_at = next(e["time"] for e in ev if e["event"] == "wake")
    assert [e for e in ev if e["event"] == "request"][-1]["time"] > wake_at, "woken before the request"
    assert not [e for e in events(log) if e["event"] == "request_while_asleep"], \
        "a request reached a sleeping engine"
    text = s.get("/metrics").body.decode()
    assert 'action="sleep"' in text or "swapper_host_used_bytes" in text


def test_host_budget_overflow_stops_the_lru_sleeper_process(swapper_factory, tmp_path, openai_client):
    # each fake child measures ~150 MiB (96 MiB "weights" + three interpreters): one sleeper fits
    s = swapper_factory("--max-models", "1", "--host-budget", "250MiB",
                        config=fake_config(tmp_path, ["a", "b", "c"]),
                        env=fake_env(tmp_path, FAKE_VLLM_WEIGHTS_MIB="96"))
    client = openai_client(s)
    for name in ("a", "b", "c"):
        chat(client, name)
    s.wait_for(lambda: s.status("a")["value"] == "unloaded", 30, "the LRU sleeper to stop")
    assert s.status("b")["value"] == "sleeping" and s.status("c")["value"] == "loaded"
    log = tmp_path / "events.jsonl"
    a_pid = next(e["pid"] for e in events(log) if e["event"] == "start" and e["model"] == "a")
    s.wait_for(lambda: not alive(a_pid), 20, "a's engine to exit")
    kinds = [e["event"] for e in events(log) if e["model"] == "a"]
    assert "sleep" in kinds and kinds[-1] == "exit", "slept first, then stopped with SIGTERM when b slept too"
    assert not s.status("a")["failed"]


def test_vllm_cold_starts_are_serialised_on_a_device(swapper_factory, tmp_path):
    s = swapper_factory("--preload", "a", "--preload", "b", config=fake_config(tmp_path, ["a", "b"], sleep=False),
                        env=fake_env(tmp_path, FAKE_VLLM_START_SECONDS="1.0"))
    s.wait_for(lambda: s.status("a")["value"] == "loaded" and s.status("b")["value"] == "loaded", 60, "preloads")
    ev = events(tmp_path / "events.jsonl")
    starts = sorted((e["time"], e["model"]) for e in ev if e["event"] == "start")
    ready = {e["model"]: e["time"] for e in ev if e["event"] == "ready"}
    assert len(starts) == 2
    first = starts[0][1]
    assert starts[1][0] >= ready[first], "the second vLLM started while the first was still sizing its cache"


def test_serve_form_argv_and_no_gpu_sizing_on_cpu(swapper_factory, tmp_path, openai_client):
    s = swapper_factory(config=fake_config(tmp_path, ["a"], sleep=False, serve_form=True), env=fake_env(tmp_path))
    chat(openai_client(s), "a")
    start = next(e for e in events(tmp_path / "events.jsonl") if e["event"] == "start")
    argv = start["argv"]
    assert argv[0] == "serve" and argv[1] == str(tmp_path / "hf" / "a"), "vllm serve MODEL"
    assert argv[argv.index("--served-model-name") + 1] == "a"
    assert "--gpu-memory-utilization" not in argv and "--kv-cache-memory-bytes" in argv
    assert "--enable-sleep-mode" not in argv and start["env"]["VLLM_SERVER_DEV_MODE"] is None
    work = start["env"]["TMPDIR"]
    assert start["env"]["VLLM_RPC_BASE_PATH"] == work and len(work) <= 60, "room for socket names"
    assert os.path.realpath(work).startswith(str(s.state_dir / "run")), "the child's own workdir"
    assert start["env"]["HF_HUB_OFFLINE"] == "1" and start["env"]["VLLM_NO_USAGE_STATS"] == "1"


def test_engine_crash_leaves_no_socket_files(swapper_factory, tmp_path, openai_client):
    import signal

    s = swapper_factory(config=fake_config(tmp_path, ["a"], sleep=False), env=fake_env(tmp_path))
    chat(openai_client(s), "a")
    start = next(e for e in events(tmp_path / "events.jsonl") if e["event"] == "start")
    work = Path(start["env"]["TMPDIR"])
    assert [p for p in work.iterdir() if p.is_socket()], "the engine bound an IPC socket in its workdir"
    os.kill(start["pid"], signal.SIGKILL)
    s.wait_for(lambda: s.status("a")["exit_code"] is not None, 20, "the crash to be noticed")
    real = work.resolve()
    s.wait_for(lambda: not real.exists() and not os.path.lexists(work), 10, "the crashed engine's files to go")
    assert not list((s.state_dir / "run").rglob("*")), "nothing left in the children's run directory"


