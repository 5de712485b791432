"""Memory probes, tested at the library boundary: fake pynvml / amdsmi modules, the real psutil."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
import time
from collections import namedtuple

import pytest

from swapper import gpu
from swapper.gpu import AmdSmiProbe, HostProbe, NvmlProbe, ProbeError, detect, import_amdsmi

GiB = 1 << 30
Mem = namedtuple("Mem", "total used free")
Proc = namedtuple("Proc", "pid usedGpuMemory")


class FakeNvml(types.ModuleType):
    """The pynvml calls swapper makes, answering like an 80 GB H100 with two processes."""

    def __init__(self, count: int = 1, procs: list[Proc] | None = None, fail_init: bool = False):
        super().__init__("pynvml")
        self.count = count
        self.procs = procs if procs is not None else [Proc(4242, 3 * GiB), Proc(4343, None)]
        self.fail_init = fail_init
        self.used = 10 * GiB

    def nvmlInit(self):
        if self.fail_init:
            raise RuntimeError("NVML Shared Library Not Found")

    def nvmlDeviceGetCount(self):
        return self.count

    def nvmlDeviceGetHandleByIndex(self, i):
        return ("handle", i)

    def nvmlDeviceGetName(self, h):
        return b"NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetUUID(self, h):
        return f"GPU-uuid-{h[1]}"

    def nvmlDeviceGetMemoryInfo(self, h):
        return Mem(80 * GiB, self.used, 80 * GiB - self.used)

    def nvmlDeviceGetComputeRunningProcesses(self, h):
        return self.procs

    def nvmlDeviceGetGraphicsRunningProcesses(self, h):
        return []


class FakeAmdSmi(types.ModuleType):
    class AmdSmiMemoryType:
        VRAM = "vram"

    def __init__(self):
        super().__init__("amdsmi")
        self.used = 20 * GiB

    def amdsmi_init(self):
        pass

    def amdsmi_get_processor_handles(self):
        return ["gpu0", "gpu1"]

    def amdsmi_get_gpu_asic_info(self, h):
        return {"market_name": "AMD Instinct MI300X"}

    def amdsmi_get_gpu_memory_total(self, h, kind):
        assert kind == "vram"
        return 192 * GiB

    def amdsmi_get_gpu_memory_usage(self, h, kind):
        return self.used

    def amdsmi_get_gpu_process_list(self, h):
        return [{"pid": 77, "name": "llama-server", "memory_usage": {"gtt_mem": 0, "cpu_mem": 0, "vram_mem": 5 * GiB}}]


def test_nvml_probe_reads_device_and_per_process_memory():
    nv = FakeNvml()
    p = NvmlProbe(0, nvml=nv)
    assert p.name == "NVIDIA H100 80GB HBM3" and p.kind == "nvidia" and p.offload
    m = p.memory()
    assert (m.total, m.used, m.free) == (80 * GiB, 10 * GiB, 70 * GiB)
    assert p.process_bytes([4242, 1]) == 3 * GiB
    assert p.process_bytes([4343]) is None, "a process without a visible number is not zero"
    assert p.process_bytes([999]) is None, "PIDs hidden inside containers"
    assert p.child_env()["CUDA_VISIBLE_DEVICES"] == "GPU-uuid-0", "children are pinned to the probed GPU"


def test_nvml_probe_rejects_a_missing_device_and_a_missing_library():
    with pytest.raises(ProbeError):
        NvmlProbe(3, nvml=FakeNvml(count=1))
    with pytest.raises(ProbeError):
        NvmlProbe(0, nvml=FakeNvml(fail_init=True))


def test_amdsmi_probe_reads_vram_and_processes():
    p = AmdSmiProbe(1, amdsmi=FakeAmdSmi())
    assert p.name == "AMD Instinct MI300X" and p.index == 1
    m = p.memory()
    assert (m.total, m.used, m.free) == (192 * GiB, 20 * GiB, 172 * GiB)
    assert p.process_bytes([77]) == 5 * GiB
    # ROCR picks the GPU; HIP's index counts within what ROCR leaves visible, so it is 0
    assert p.child_env() == {"ROCR_VISIBLE_DEVICES": "1", "HIP_VISIBLE_DEVICES": "0"}


def test_device_choice_picks_the_probe(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml(count=2))
    monkeypatch.setitem(sys.modules, "amdsmi", FakeAmdSmi())
    assert detect("nvidia:1").index == 1 and detect("nvidia:1").kind == "nvidia"
    assert detect("amd:0").kind == "amd"
    assert detect("cpu").kind == "host"
    monkeypatch.setattr(gpu, "is_unified_memory", lambda: False)
    assert detect("auto").kind == "nvidia", "auto tries NVML first"


def test_auto_falls_back_to_amd_then_host(monkeypatch):
    monkeypatch.setattr(gpu, "is_unified_memory", lambda: False)
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml(fail_init=True))
    monkeypatch.setitem(sys.modules, "amdsmi", FakeAmdSmi())
    assert detect("auto").kind == "amd"
    monkeypatch.delitem(sys.modules, "amdsmi")
    monkeypatch.setattr(gpu, "import_amdsmi", lambda: None)
    assert detect("auto").kind == "host"


def test_unified_memory_boards_use_the_host_probe_with_offload(monkeypatch):
    monkeypatch.setattr(gpu, "is_unified_memory", lambda: True)
    p = detect("auto")
    assert p.kind == "host" and p.offload is True


def test_importing_a_broken_amdsmi_is_silent(tmp_path, monkeypatch, capfd):
    (tmp_path / "amdsmi.py").write_text("print('libamd_smi.so not found')\nraise KeyError('ROCM_PATH')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "amdsmi", raising=False)
    assert import_amdsmi() is None
    out = capfd.readouterr()
    assert "libamd_smi" not in out.out and "libamd_smi" not in out.err
    with pytest.raises(ProbeError):
        AmdSmiProbe(0)


def test_host_probe_measures_a_process_tree_with_psutil():
    p = HostProbe()
    m = p.memory()
    assert m.total > m.free > 0 and m.used > 0
    own = p.process_bytes([os.getpid()])
    assert own and own > 5 << 20
    assert p.process_bytes([os.getpid(), os.getppid()]) > own, "a tree sums its processes"
    assert p.process_bytes([2**22 + 7]) is None


def test_gpu_command_shows_what_was_detected():
    r = subprocess.run([sys.executable, "-m", "swapper", "gpu", "--json"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    host = [d for d in doc["devices"] if d["kind"] == "host"][0]
    assert host["total"] > 0 and host["free"] > 0
    assert doc["selected"].startswith(("nvidia", "amd", "host"))
    r = subprocess.run([sys.executable, "-m", "swapper", "gpu"], capture_output=True, text=True, timeout=60)
    assert "TOTAL" in r.stdout and "host" in r.stdout


def test_host_probe_uses_pss_for_multi_process_engines_so_shared_pages_count_once():
    import psutil

    procs = [subprocess.Popen([sys.executable, "-c", "import time, json, asyncio; time.sleep(30)"]) for _ in range(3)]
    try:
        pids = [p.pid for p in procs]
        end = time.monotonic() + 30  # until every interpreter has mapped libpython
        while time.monotonic() < end and not all(psutil.Process(pid).memory_info().rss > 4 << 20 for pid in pids):
            time.sleep(0.02)
        rss = sum(psutil.Process(pid).memory_info().rss for pid in pids)
        measured = HostProbe().process_bytes(pids)
        assert measured is not None and 0 < measured < rss, "three interpreters share libpython's pages"
    finally:
        for p in procs:
            p.kill()
            p.wait()
