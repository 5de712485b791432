"""Which devices swapper plans, and the group of them a child starts on.

`--device` names a vendor's devices: `auto` (every visible device of the first vendor found:
NVIDIA, then AMD, else the host), `nvidia:all`, `amd:all`, a list (`nvidia:0,2`), one device
(`nvidia:1`), or `cpu`. Each planned device gets its own probe (`gpu.py`), ledger and budget.

- Visibility: when swapper itself runs with `CUDA_VISIBLE_DEVICES` (NVIDIA) or
  `ROCR_VISIBLE_DEVICES` / `HIP_VISIBLE_DEVICES` (AMD) set, only the devices it lists (by index
  or UUID, a UUID prefix as CUDA accepts it; a GPU in MIG mode named by index or UUID stands for
  its instances) are planned: NVML and AMD-SMI enumerate every device regardless, so the
  variables are applied here.
- MIG: a GPU in MIG mode is planned as its MIG instances, one device each (`nvidia:0/mig1`,
  its memory and UUID from NVML), and a child sees its instance by UUID. CUDA shows a process
  one MIG instance at most, so a model is never split across MIG instances.
- `DeviceGroup` is what a child's backend sees: the visibility variables naming its devices by
  UUID, their summed memory, and the split proportions.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterable

from .gpu import (AmdSmiProbe, DeviceMemory, HostProbe, MemoryProbe, NvmlProbe, ProbeError, detect, import_amdsmi,
                  is_unified_memory, probe_id)


def _visible(env_var: str) -> list[str] | None:
    v = os.environ.get(env_var)
    if v is None:
        return None
    return [x.strip() for x in v.split(",") if x.strip() and x.strip() != "-1"]


def _shown(p: Any, visible: list[str] | None) -> bool:
    if visible is None:
        return True
    uuids = [u for u in (getattr(p, "uuid", None), getattr(p, "parent_uuid", None)) if u]
    for v in visible:
        if v == str(p.index):  # a GPU by index (for a GPU in MIG mode: its instances)
            return True
        if len(v) >= 5 and any(u.startswith(v) for u in uuids):  # by UUID or a unique prefix
            return True
    return False


def nvidia_probes(nvml: Any = None, indices: Iterable[int] | None = None) -> list[MemoryProbe]:
    """Every NVIDIA device NVML shows and CUDA_VISIBLE_DEVICES leaves, MIG instances split out."""
    if nvml is None:
        try:
            import pynvml as nvml  # type: ignore[no-redef]
        except ImportError:
            return []
    count = NvmlProbe.count(nvml)
    wanted = set(indices) if indices is not None else None
    visible = _visible("CUDA_VISIBLE_DEVICES")
    out: list[MemoryProbe] = []
    for i in range(count):
        if wanted is not None and i not in wanted:
            continue
        gpu = NvmlProbe(i, nvml=nvml)
        for p in _mig_instances(nvml, gpu) or [gpu]:
            if _shown(p, visible):
                out.append(p)
    return out


def _mig_instances(nvml: Any, gpu: NvmlProbe) -> list[NvmlProbe]:
    try:
        current, _pending = nvml.nvmlDeviceGetMigMode(gpu._h)
    except Exception:  # no MIG support (consumer GPUs, old drivers)
        return []
    if not current:
        return []
    out = []
    for j in range(int(nvml.nvmlDeviceGetMaxMigDeviceCount(gpu._h))):
        try:
            out.append(NvmlProbe(gpu.index, nvml=nvml, mig=j))
        except ProbeError:
            continue  # an empty slot
    if not out:
        raise ProbeError(f"NVIDIA device {gpu.index} is in MIG mode but has no MIG instances: create them "
                         "(nvidia-smi mig -cgi ... -C) or turn MIG off")
    return out


def amd_probes(amdsmi: Any = None, indices: Iterable[int] | None = None) -> list[MemoryProbe]:
    amdsmi = amdsmi or import_amdsmi()
    count = AmdSmiProbe.count(amdsmi)
    wanted = set(indices) if indices is not None else None
    visible = _visible("ROCR_VISIBLE_DEVICES")
    if visible is None:
        visible = _visible("HIP_VISIBLE_DEVICES")
    out: list[MemoryProbe] = []
    for i in range(count):
        if wanted is not None and i not in wanted:
            continue
        p = AmdSmiProbe(i, amdsmi=amdsmi)
        if _shown(p, visible):
            out.append(p)
    return out


def detect_all(device: str = "auto") -> list[MemoryProbe]:
    """The probes of every device a `--device` setting plans (at least one)."""
    device = device.lower().strip()
    kind, _, sel = device.partition(":")
    if kind in ("cpu", "auto") and sel:
        raise ProbeError(f"unknown device {device!r}")
    if kind == "cpu":
        return [detect("cpu")]
    if kind == "auto":
        if is_unified_memory():
            return [HostProbe(offload=True)]
        for found in (nvidia_probes, amd_probes):
            try:
                probes = found()
            except ProbeError:
                raise
            except Exception:
                continue
            if probes:
                return probes
        return [HostProbe(offload=False)]
    if kind not in ("nvidia", "amd"):
        raise ProbeError(f"unknown device {device!r}")
    finder = nvidia_probes if kind == "nvidia" else amd_probes
    if sel in ("", "all"):
        probes = finder()
    elif "," in sel:
        try:
            indices = [int(x) for x in sel.split(",")]
        except ValueError:
            raise ProbeError(f"bad device list {device!r}: expected {kind}:0,2") from None
        probes = finder(indices=indices)
        missing = set(indices) - {p.index for p in probes}
        if missing:
            raise ProbeError(f"{kind} device(s) {sorted(missing)} not found or not visible")
    else:
        return [detect(device)]  # one device, exactly as before
    if not probes:
        raise ProbeError(f"no {kind} device found (or none visible)")
    return probes


@dataclass
class DeviceGroup:
    """The devices one child runs on, as its backend sees them."""

    probes: list[MemoryProbe]
    split: tuple[float, ...] = ()

    @property
    def kind(self) -> str:
        return self.probes[0].kind

    @property
    def index(self) -> int:
        return self.probes[0].index

    @property
    def name(self) -> str:
        return ", ".join(probe_id(p) for p in self.probes)

    @property
    def offload(self) -> bool:
        return self.probes[0].offload

    @property
    def count(self) -> int:
        return len(self.probes)

    def memory(self) -> DeviceMemory:
        mems = [p.memory() for p in self.probes]
        return DeviceMemory(sum(m.total for m in mems), sum(m.used for m in mems), sum(m.free for m in mems))

    def processes(self) -> list:
        return [x for p in self.probes for x in p.processes()]

    def process_bytes(self, pids: Iterable[int]) -> int | None:
        pids = list(pids)
        vals = [b for b in (p.process_bytes(pids) for p in self.probes) if b is not None]
        return sum(vals) if vals else None

    def child_env(self) -> dict[str, str]:
        if len(self.probes) == 1:
            return self.probes[0].child_env()
        names = ",".join(getattr(p, "uuid", None) or str(p.index) for p in self.probes)
        if self.kind == "nvidia":
            return {"CUDA_VISIBLE_DEVICES": names, "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
        if self.kind == "amd":
            return {"ROCR_VISIBLE_DEVICES": names, "HIP_VISIBLE_DEVICES": ",".join(map(str, range(len(self.probes))))}
        return {}
