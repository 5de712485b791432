"""Which devices a `--device` setting plans, against fake pynvml / amdsmi modules with several
devices: every GPU, a list, devices hidden by the visibility variables, MIG instances; and the
environment and flags a child gets for the devices it runs on."""

from __future__ import annotations

import sys
from collections import namedtuple

import pytest

from swapper import device_set, gpu
from swapper.device_set import DeviceGroup, detect_all
from swapper.gpu import ProbeError, probe_id
from test_gpu import FakeAmdSmi, FakeNvml

GiB = 1 << 30
Mem = namedtuple("Mem", "total used free")
Proc = namedtuple("Proc", "pid usedGpuMemory")


class FakeNode(FakeNvml):
    """An NVIDIA node: `count` 80 GB GPUs, each with its own used memory and processes; the
    GPUs in `mig` are in MIG mode with two instances (a 3g.40gb and a 2g.20gb)."""

    def __init__(self, count: int = 4, mig: set[int] = frozenset()):
        super().__init__(count=count)
        self.mig = set(mig)
        self.used_by = {i: (i + 1) * GiB for i in range(count)}
        self.procs_by = {i: [Proc(100 + i, 2 * GiB)] for i in range(count)}

    def nvmlDeviceGetUUID(self, h):
        if h[0] == "mig":
            return f"MIG-{h[1]}-{h[2]}-abcdef"
        return f"GPU-{h[1]}1111111-2222"

    def nvmlDeviceGetMigMode(self, h):
        return (1 if h[1] in self.mig else 0, 0)

    def nvmlDeviceGetMaxMigDeviceCount(self, h):
        return 7

    def nvmlDeviceGetMigDeviceHandleByIndex(self, h, j):
        if j >= 2:
            raise RuntimeError("NVML_ERROR_NOT_FOUND")
        return ("mig", h[1], j)

    def nvmlDeviceGetMemoryInfo(self, h):
        if h[0] == "mig":
            total = 40 * GiB if h[2] == 0 else 20 * GiB
            return Mem(total, GiB, total - GiB)
        used = self.used_by[h[1]]
        return Mem(80 * GiB, used, 80 * GiB - used)

    def nvmlDeviceGetComputeRunningProcesses(self, h):
        return [] if h[0] == "mig" else self.procs_by[h[1]]


@pytest.fixture
def nvidia(monkeypatch):
    def install(**kw):
        nv = FakeNode(**kw)
        monkeypatch.setitem(sys.modules, "pynvml", nv)
        monkeypatch.setattr(gpu, "is_unified_memory", lambda: False)
        monkeypatch.setattr(device_set, "is_unified_memory", lambda: False)
        return nv
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return install


def test_auto_and_all_plan_every_nvidia_gpu_each_with_its_own_reading(nvidia):
    nvidia(count=4)
    for spec in ("auto", "nvidia:all", "nvidia"):
        probes = detect_all(spec) if spec != "nvidia" else detect_all("nvidia:all")
        assert [probe_id(p) for p in probes] == ["nvidia:0", "nvidia:1", "nvidia:2", "nvidia:3"], spec
    probes = detect_all("auto")
    assert [p.memory().used for p in probes] == [1 * GiB, 2 * GiB, 3 * GiB, 4 * GiB]
    assert probes[2].process_bytes([102]) == 2 * GiB and probes[1].process_bytes([102]) is None


def test_a_list_plans_just_those_gpus_and_a_missing_one_is_an_error(nvidia):
    nvidia(count=4)
    assert [p.index for p in detect_all("nvidia:0,2")] == [0, 2]
    with pytest.raises(ProbeError, match=r"\[5\]"):
        detect_all("nvidia:1,5")
    assert [p.index for p in detect_all("nvidia:3")] == [3], "one device, as before"


def test_a_gpu_hidden_by_cuda_visible_devices_is_not_planned(nvidia, monkeypatch):
    nvidia(count=4)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,GPU-31111111,2")  # by index and by UUID prefix; 1 hidden
    assert [probe_id(p) for p in detect_all("auto")] == ["nvidia:0", "nvidia:2", "nvidia:3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setitem(sys.modules, "amdsmi", None)
    assert detect_all("auto")[0].kind == "host", "no visible GPU: the host"
    with pytest.raises(ProbeError, match="no nvidia device"):
        detect_all("nvidia:all")


def test_mig_instances_are_planned_as_devices_by_uuid_and_never_split_across(nvidia):
    nvidia(count=2, mig={1})
    probes = detect_all("auto")
    assert [probe_id(p) for p in probes] == ["nvidia:0", "nvidia:1/mig0", "nvidia:1/mig1"]
    mig = probes[1]
    assert mig.mig and mig.uuid == "MIG-1-0-abcdef" and mig.memory().total == 40 * GiB
    assert mig.child_env()["CUDA_VISIBLE_DEVICES"] == "MIG-1-0-abcdef"
    assert probes[2].memory().total == 20 * GiB

    from swapper.sched.runner import Scheduler
    from schedfakes import FakeEstimator, FakeLauncher, entry
    from swapper.catalog import Catalog
    from swapper.sched import SchedulerConfig
    from swapper.units import SizeSpec

    sched = Scheduler(Catalog([entry("m")]), probes, FakeLauncher(probes[0]), FakeEstimator({"m": GiB}),
                      SchedulerConfig(budget=SizeSpec(fraction=0.9), reserve=0))
    assert [d.splittable for d in sched.core.devices.values()] == [True, False, False]


def test_a_mig_instance_can_be_named_in_visibility_variables(nvidia, monkeypatch):
    nvidia(count=2, mig={1})
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-1-1-abcdef")
    assert [probe_id(p) for p in detect_all("auto")] == ["nvidia:1/mig1"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-11111111-2222")  # the MIG GPU itself: its instances
    assert [probe_id(p) for p in detect_all("auto")] == ["nvidia:1/mig0", "nvidia:1/mig1"]


def test_amd_all_plans_every_amd_gpu_and_honours_rocr_visible_devices(monkeypatch):
    monkeypatch.setitem(sys.modules, "amdsmi", FakeAmdSmi())
    monkeypatch.delenv("ROCR_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("HIP_VISIBLE_DEVICES", raising=False)
    assert [probe_id(p) for p in detect_all("amd:all")] == ["amd:0", "amd:1"]
    monkeypatch.setenv("ROCR_VISIBLE_DEVICES", "1")
    assert [probe_id(p) for p in detect_all("amd:all")] == ["amd:1"]


def test_a_child_sees_only_its_devices_by_uuid(nvidia):
    nvidia(count=4)
    p = detect_all("auto")
    group = DeviceGroup([p[1], p[3]], (0.4, 0.6))
    assert group.child_env() == {"CUDA_VISIBLE_DEVICES": "GPU-11111111-2222,GPU-31111111-2222",
                                 "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    assert group.memory().total == 160 * GiB
    assert DeviceGroup([p[2]], (1.0,)).child_env()["CUDA_VISIBLE_DEVICES"] == "GPU-21111111-2222"


def test_an_amd_child_gets_rocr_by_device_and_hip_counting_within_it(monkeypatch):
    from swapper.gpu import AmdSmiProbe

    a = FakeAmdSmi()
    group = DeviceGroup([AmdSmiProbe(0, amdsmi=a), AmdSmiProbe(1, amdsmi=a)], (0.5, 0.5))
    assert group.child_env() == {"ROCR_VISIBLE_DEVICES": "0,1", "HIP_VISIBLE_DEVICES": "0,1"}


def test_config_accepts_device_lists_and_per_device_budgets(tmp_path):
    from swapper.config import ConfigError
    from swapper.settings_load import load_settings

    cfg = tmp_path / "c.yaml"
    cfg.write_text("device: nvidia:0,2\ndevices:\n  nvidia:2: {budget: 60GiB, reserve: 1GiB}\n"
                   "models:\n  m: {path: /x.gguf, device: nvidia:2}\n")
    st = load_settings(None, config_file=str(cfg))
    assert st.device == "nvidia:0,2"
    assert st.devices["nvidia:2"].budget.resolve(0) == 60 * GiB and st.devices["nvidia:2"].reserve == GiB
    assert st.models["m"].device == "nvidia:2"
    cfg.write_text("devices:\n  nvidia:2: {budgett: 1GiB}\n")
    with pytest.raises(ConfigError, match="budgett"):
        load_settings(None, config_file=str(cfg))
    cfg.write_text("models:\n  m: {path: /x.gguf, device: gpu7}\n")
    with pytest.raises(ConfigError, match="device"):
        load_settings(None, config_file=str(cfg))


def _gpus(n: int) -> list:
    from swapper.gpu import FakeProbe

    class Gpu(FakeProbe):
        @property
        def uuid(self) -> str:
            return f"GPU-{self.index}"

        def child_env(self) -> dict[str, str]:
            return {"CUDA_VISIBLE_DEVICES": f"GPU-{self.index}"}

    return [Gpu(total=80 * GiB, kind="nvidia", index=i, offload=True) for i in range(n)]


def test_a_llamacpp_child_split_over_two_gpus_gets_layer_split_in_its_proportions(tmp_path):
    from test_chat_template import gguf_header, settings_with
    from swapper.backends.llamacpp import LlamaCppBackend
    from swapper.catalog import build_catalog

    (tmp_path / "models").mkdir()
    gguf_header(tmp_path / "models" / "m.gguf", "llama")
    st = settings_with(tmp_path, {})
    e = build_catalog(st).get("m")
    g = _gpus(2)
    split = LlamaCppBackend(st).start_spec(e, 4321, DeviceGroup(g, (0.375, 0.625)), GiB, str(tmp_path))
    i = split.argv.index("--tensor-split")
    assert split.argv[i - 2:i + 2] == ["--split-mode", "layer", "--tensor-split", "0.3750,0.6250"]
    assert split.env["CUDA_VISIBLE_DEVICES"] == "GPU-0,GPU-1", "only its devices, by UUID"
    one = LlamaCppBackend(st).start_spec(e, 4321, DeviceGroup(g[1:], (1.0,)), GiB, str(tmp_path))
    assert "--tensor-split" not in one.argv and one.env["CUDA_VISIBLE_DEVICES"] == "GPU-1"


def test_a_vllm_child_split_over_four_gpus_gets_tensor_parallelism(tmp_path):
    from test_vllm_backend import entry_of, hf_folder, settings
    from swapper.backends.vllm import VllmBackend

    hf_folder(tmp_path / "models")
    st = settings(tmp_path / "models")
    e = entry_of(st)
    work = tmp_path / "w"
    work.mkdir()
    spec = VllmBackend(st).start_spec(e, 4321, DeviceGroup(_gpus(4), (0.25,) * 4), 160 * GiB, str(work))
    argv = spec.argv
    assert argv[argv.index("--tensor-parallel-size") + 1] == "4"
    # each GPU holds a quarter of the reservation: 40 of its 80 GiB
    assert argv[argv.index("--gpu-memory-utilization") + 1] == "0.5000"
    assert spec.env["CUDA_VISIBLE_DEVICES"] == "GPU-0,GPU-1,GPU-2,GPU-3"


def test_gpu_command_lists_every_gpu_and_mig_instance_and_marks_the_planned(nvidia, monkeypatch, capsys):
    import json

    from swapper.cli import main

    nvidia(count=2, mig={1})
    monkeypatch.setitem(sys.modules, "amdsmi", None)
    assert main(["gpu", "--json", "--device", "nvidia:all"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["planned"] == ["nvidia:0", "nvidia:1/mig0", "nvidia:1/mig1"]
    rows = {d["id"]: d for d in doc["devices"]}
    assert rows["nvidia:1/mig1"]["total"] == 20 * GiB and rows["nvidia:1/mig1"]["planned"]
    assert not rows["nvidia:1"]["planned"], "a GPU in MIG mode is planned as its instances"
    assert rows["host:0"]["planned"] is False
