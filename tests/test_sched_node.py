"""The whole scheduler on a fake multi-GPU node: fake probes per device, a fake launcher that
puts each child's memory on the devices of its placement, requests as real leases.
"""

from __future__ import annotations

import asyncio
import random

import pytest

from schedfakes import node
from swapper.gpu import FakeProbe
from swapper.sched.ledger import Reading

GiB = 1 << 30
BUDGET = 20 * GiB

pytestmark = pytest.mark.asyncio


async def run_trace(ndev: int, sizes: dict[str, int], steps: int, seed: int,  # noqa: ANN201
                    vllm: set[str] = frozenset()):
    """Random requests (at most 3 streams held open at once) on `ndev` fake GPUs; checks every
    device against its budget after every event burst and that no model is stopped while it
    serves; returns the node and, per model, the device sets it was served from."""
    n = node(ndev, sizes, BUDGET, max_wait=5.0, drain_timeout=600, vllm=vllm)
    s, launcher = n.sched, n.launcher
    violations: list[str] = []
    real_stop = launcher.stop

    async def stop(instance, entry):  # noqa: ANN001
        if s.models[entry.id].inflight:
            violations.append(f"{entry.id} stopped with {s.models[entry.id].inflight} in flight")
        await real_stop(instance, entry)

    launcher.stop = stop  # type: ignore[method-assign]
    served: dict[str, set[tuple[str, ...]]] = {}
    holds: list[tuple[asyncio.Task, asyncio.Event]] = []

    async def client(name: str, hold: asyncio.Event) -> None:
        async with s.acquire(name):
            served.setdefault(name, set()).add(tuple(sorted(launcher.placements[name])))
            await hold.wait()

    def check(step: int) -> None:
        for d, used in n.used().items():
            if used > BUDGET:
                violations.append(f"step {step}: {d} uses {used / GiB:.1f} GiB")

    rng = random.Random(seed)
    names = list(sizes)
    for step in range(steps):
        if rng.random() < 0.6:
            hold = asyncio.Event()
            name = names[len(holds)] if len(holds) < len(names) else rng.choice(names)  # each at least once
            holds.append((asyncio.create_task(client(name, hold)), hold))
        busy = [h for h in holds if not h[1].is_set()]
        while len(busy) > 3 or (busy and rng.random() < 0.4):  # at most 3 streams at once
            busy.pop(rng.randrange(len(busy)))[1].set()
        await n.spin()
        check(step)
        n.clock.advance(0.5)
        s.tick()
        await n.spin()
        check(step)
    for _, hold in holds:
        hold.set()
    for _ in range(400):
        if all(t.done() for t, _ in holds):
            break
        n.clock.advance(0.5)
        s.tick()
        await n.spin()
        check(-1)
    assert all(t.done() and t.exception() is None for t, _ in holds), \
        [t.exception() if t.done() else "pending" for t, _ in holds]
    assert not violations, violations[:5]
    assert len(launcher.stops) >= 10 and len(holds) >= steps // 3, (len(launcher.stops), len(holds))
    assert len({d for devs in served.values() for p in devs for d in p}) == ndev, "every GPU was used"
    return n, served


async def test_a_trace_of_twelve_models_on_four_gpus_keeps_every_device_in_budget():
    """12 models of mixed sizes (three larger than one device) under random traffic with
    concurrent streams: every device under its budget at every step, no model stopped while
    it serves, and the models larger than one device served split."""
    sizes = {"a2": 2, "b3": 3, "c4": 4, "d6": 6, "e8": 8, "f10": 10, "g12": 12, "h14": 14, "i16": 16,
             "split24": 24, "split30": 30, "split36": 36}
    n, served = await run_trace(4, {k: v * GiB for k, v in sizes.items()}, 240, seed=15)
    for big in ("split24", "split30", "split36"):
        assert big in served, f"{big} was never served"
        assert all(len(devs) >= 2 for devs in served[big]), served[big]
    assert len(n.launcher.stops) >= 20


@pytest.mark.parametrize("ndev,sizes", [
    (2, {"a3": 3, "b6": 6, "c10": 10, "d16": 16, "split30": 30}),
    (8, {**{f"m{i}": 2 + 3 * (i % 6) for i in range(14)}, "split30": 30, "split50": 50, "split70": 70,
         "split_tp36": 36}),
])
async def test_traces_on_two_and_eight_gpus_keep_every_device_in_budget(ndev, sizes):
    _, served = await run_trace(ndev, {k: v * GiB for k, v in sizes.items()}, 160, seed=ndev, vllm={"split_tp36"})
    for big in (k for k in sizes if k.startswith("split")):
        least = -(-sizes[big] * GiB // BUDGET)  # devices it needs at the very least
        assert big in served and all(len(devs) >= least for devs in served[big]), served.get(big)
    for devs in served.get("split_tp36", ()):
        assert len(devs) in (2, 4, 8), "tensor parallelism over a power of two of GPUs"


async def test_a_model_pinned_to_a_device_runs_there_with_only_that_device_given_to_it():
    n = node(2, {"a": 4 * GiB, "p": 4 * GiB}, BUDGET, device={"p": "fake:1"})
    async with asyncio.timeout(30), n.sched.acquire("p"):
        assert n.launcher.placements["p"] == {"fake:1": 1.0}
    async with n.sched.acquire("a"):  # best fit: fake:1 is left with 12 GiB free, fake:0 would keep 16
        assert n.launcher.placements["a"] == {"fake:1": 1.0}
    assert n.used() == {"fake:0": 0, "fake:1": 8 * GiB}


async def test_each_device_has_its_own_budget_and_reading():
    from swapper.sched.settings import DeviceLimits
    from swapper.units import SizeSpec

    n = node(2, {"a": 11 * GiB}, BUDGET, devices={"fake:1": DeviceLimits(budget=SizeSpec(bytes=12 * GiB))})
    n.devices["fake:0"].used = 14 * GiB  # another process holds most of fake:0
    # fake:0 plans 20 GiB but shows 10 free; fake:1 plans 12: only fake:1 holds 11 GiB now
    async with asyncio.timeout(30):
        async with n.sched.acquire("a"):
            pass
    assert n.launcher.placements["a"] == {"fake:1": 1.0}
    view = {d["id"]: d for d in n.sched.device_view()}
    assert view["fake:1"]["capacity"] == 12 * GiB and view["fake:0"]["capacity"] == BUDGET
    assert view["fake:0"]["reading"] == Reading(24 * GiB, 14 * GiB, 10 * GiB)
    assert view["fake:1"]["models"] == {"a": 11 * GiB} and view["fake:0"]["models"] == {}
    assert n.used() == {"fake:0": 14 * GiB, "fake:1": 11 * GiB}


def test_fake_probe_ids_name_each_device():
    from swapper.gpu import probe_id

    assert probe_id(FakeProbe(index=3)) == "fake:3"


async def test_status_models_and_metrics_are_labelled_per_device(tmp_path):
    """The HTTP layer in process (fake children) over two fake devices: a model pinned to the
    second device is listed, measured and scraped there."""
    from aiohttp.test_utils import TestClient

    from httpfakes import FakeLauncher, JsonErrorTestServer, app_for, make_models
    from swapper.app import build_runtime
    from swapper.config import DeviceSpec, ModelSpec, Settings
    from swapper.units import SizeSpec

    models = make_models(tmp_path / "models")
    st = Settings(models_dir=str(models), state_dir=str(tmp_path / "state"), budget=SizeSpec(bytes=GiB), reserve=0,
                  devices={"fake:1": DeviceSpec(budget=SizeSpec(bytes=512 << 20))},
                  models={"p": ModelSpec(name="p", path=str(models / "b.gguf"), device="fake:1")})
    probes = [FakeProbe(total=8 * GiB, index=0), FakeProbe(total=8 * GiB, index=1)]
    rt = build_runtime(st, probe=probes, launcher=FakeLauncher())
    client = TestClient(JsonErrorTestServer(app_for(rt)))
    await client.start_server()
    try:
        chat = {"messages": [{"role": "user", "content": "hi"}]}
        for model in ("p", "a"):
            r = await client.post("/v1/chat/completions", json={"model": model, **chat})
            assert r.status == 200, await r.text()
        listed = {m["id"]: m for m in (await (await client.get("/models")).json())["data"]}
        assert list(listed["p"]["devices"]) == ["fake:1"] and listed["p"]["devices"]["fake:1"] > 0
        assert list(listed["a"]["devices"]) == ["fake:1"], "best fit: the smaller device still has room"
        status = await (await client.get("/api/status")).json()
        devs = {d["id"]: d for d in status["devices"]}
        assert devs["fake:1"]["capacity_bytes"] == 512 << 20 and devs["fake:0"]["capacity_bytes"] == GiB
        assert set(devs["fake:1"]["models"]) == {"p", "a"} and devs["fake:0"]["models"] == {}
        assert status["capacity_bytes"] == GiB + (512 << 20), "the node's total stays where it was"
        text = await (await client.get("/metrics")).text()
        assert 'swapper_capacity_bytes{device="fake:1"} 5.36870912e+08' in text
        assert 'swapper_capacity_bytes{device="fake:0"}' in text
        assert 'swapper_model_device_bytes{device="fake:1",model="p"}' in text
    finally:
        await client.close()
