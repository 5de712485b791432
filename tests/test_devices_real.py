"""Several devices with real llama-server children, on CPU: two "devices" carved out of host RAM.

Each pretend device is a host probe that sees only the children started on it (it marks them
through `child_env`, exactly where a GPU probe sets CUDA_VISIBLE_DEVICES) and reports their
real memory (RSS) as its used bytes. Everything else is the production path: the app, the
scheduler with one ledger per device, placement, the process launcher handing each child only
its device, per-device readings and measurements.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import psutil
import pytest
from aiohttp.test_utils import TestClient

from conftest import link, synth_file
from httpfakes import JsonErrorTestServer
from swapper.app import build_runtime, create_app
from swapper.config import Settings
from swapper.gpu import DeviceMemory, HostProbe
from swapper.units import SizeSpec

pytestmark = pytest.mark.real

MiB = 1 << 20
MARK = "SWAPPER_TEST_DEVICE"


class HostSlice(HostProbe):
    """A pretend device: the host memory of the children started on it, out of `total`."""

    def __init__(self, index: int, total: int):
        super().__init__(offload=False)
        self.index = index
        self.id = f"host:{index}"
        self.name = f"host slice {index}"
        self.total = total

    def child_env(self) -> dict[str, str]:
        return {MARK: str(self.index)}

    def mine(self) -> list[int]:
        out = []
        for p in psutil.Process().children(recursive=True):
            try:
                if p.environ().get(MARK) == str(self.index):
                    out.append(p.pid)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return out

    def memory(self) -> DeviceMemory:
        used = super().process_bytes(self.mine()) or 0
        return DeviceMemory(self.total, used, max(0, self.total - used))

    def process_bytes(self, pids):  # noqa: ANN001, ANN201
        mine = set(self.mine())
        return super().process_bytes([p for p in pids if p in mine])


async def test_models_are_placed_on_two_devices_and_evicted_per_device(tmp_path: Path, llama_server_bin: str):
    models = tmp_path / "models"
    for i, name in enumerate(("a", "b", "c")):
        link(synth_file(32, 10 + i, ctx=512), models / f"{name}.gguf")
    st = Settings(models_dir=str(models), state_dir=str(tmp_path / "state"), llama_server=llama_server_bin,
                  budget=SizeSpec(bytes=160 * MiB), reserve=0, prefetch=False)
    st.defaults.ctx_size = 256
    devices = [HostSlice(0, 2048 * MiB), HostSlice(1, 2048 * MiB)]
    rt = build_runtime(st, probe=devices)
    client = TestClient(JsonErrorTestServer(create_app(rt)))
    await client.start_server()
    s = rt.scheduler
    try:
        est = {n: rt.estimator.estimate(rt.catalog.get(n)).bytes for n in "abc"}
        assert all(2 * b > 160 * MiB >= b for b in est.values()), f"a model fits a device, two estimates do not: {est}"

        async def chat(model: str) -> None:
            body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
            r = await client.post("/v1/chat/completions", json=body, timeout=240)
            assert r.status == 200, await r.text()

        def check_budgets() -> None:
            for d in s.device_view():
                used = devices[d["index"]].memory().used
                assert used <= d["capacity"], f"{d['id']} uses {used / MiB:.0f} MiB of {d['capacity'] / MiB:.0f}"

        await chat("a")
        check_budgets()
        dev_a = list(s.placement_of(s.models["a"]))
        await chat("b")
        check_budgets()
        dev_b = list(s.placement_of(s.models["b"]))
        assert len(dev_a) == len(dev_b) == 1 and dev_a != dev_b, "b does not fit beside a: the other device"
        await chat("c")  # both full: the least recently used (a) goes, on its own device only
        check_budgets()
        assert s.models["a"].state.value == "unloaded" and s.models["b"].loaded
        assert list(s.placement_of(s.models["c"])) == dev_a
        for name, dev in (("b", dev_b[0]), ("c", dev_a[0])):
            pids = rt.launcher.children[name].pids()
            engine = [p for p in pids if "llama-server" in psutil.Process(p).name()]
            assert engine, pids
            assert psutil.Process(engine[0]).environ()[MARK] == dev.split(":")[1], "only its device given"
        assert s.models["c"].measured and s.models["c"].measured <= 160 * MiB
        status = await (await client.get("/api/status")).json()
        assert {d["id"]: sorted(d["models"]) for d in status["devices"]} == {dev_a[0]: ["c"], dev_b[0]: ["b"]}
    finally:
        await client.close()
        await asyncio.wait_for(s.shutdown(5), 60)
