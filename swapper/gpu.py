"""Memory probes: the truth about how much memory a device has, uses and gives each process.

One small interface (`MemoryProbe`) with three real implementations and a fake:
- `NvmlProbe`: NVIDIA through NVML (`pynvml`, from nvidia-ml-py);
- `AmdSmiProbe`: AMD through `amdsmi` (ROCm's library; importing it without the native library
  raises KeyError and prints to stdout, so the import is silenced and every failure caught);
- `HostProbe`: host RAM through psutil, for CPU-only boxes and unified-memory machines (Jetson),
  where a child's memory is its RSS, or the PSS summed over its process tree for engines with
  several processes;
- `FakeProbe`: settable numbers for tests.
`detect("auto" | "cpu" | "nvidia:N" | "amd:N")` picks one; `auto` tries NVML, then AMD-SMI, then
the host. Several devices at once (`nvidia:all`, `nvidia:0,2`, MIG instances, the visibility
variables) are `device_set.py`'s concern; each device still gets one probe from here.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Protocol


@dataclass(frozen=True)
class DeviceMemory:
    total: int
    used: int
    free: int


@dataclass(frozen=True)
class ProcessUse:
    pid: int
    bytes: int | None  # None when the driver does not say


class ProbeError(RuntimeError):
    pass


class MemoryProbe(Protocol):
    kind: str  # nvidia | amd | host | fake
    index: int
    name: str
    offload: bool  # children put their layers on this device (GPU, or unified memory)

    def memory(self) -> DeviceMemory: ...

    def processes(self) -> list[ProcessUse]: ...

    def process_bytes(self, pids: Iterable[int]) -> int | None:
        """Memory these processes hold on the device; None when the driver hides them."""
        ...

    def child_env(self) -> dict[str, str]:
        """Environment that pins a child to this device (or the ledger would be wrong)."""
        ...


def _sum_visible(procs: list[ProcessUse], pids: Iterable[int]) -> int | None:
    wanted = set(pids)
    hits = [p.bytes for p in procs if p.pid in wanted and p.bytes is not None]
    return sum(hits) if hits else None


# ------------------------------------------------------------------------------- NVIDIA


def probe_id(p: Any) -> str:
    """A device's name in settings, metrics and status: `nvidia:1`, `nvidia:0/mig1`, `host:0`."""
    return getattr(p, "id", None) or f"{p.kind}:{p.index}"


class NvmlProbe:
    kind = "nvidia"
    offload = True
    mig = False

    def __init__(self, index: int = 0, nvml: Any = None, mig: int | None = None):
        if nvml is None:
            try:
                import pynvml as nvml  # type: ignore[no-redef]
            except ImportError as e:
                raise ProbeError("nvidia-ml-py (pynvml) is not installed") from e
        self._nvml = nvml
        try:
            nvml.nvmlInit()
            count = nvml.nvmlDeviceGetCount()
        except Exception as e:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
            raise ProbeError(f"NVML unavailable: {e}") from e
        if not 0 <= index < count:
            raise ProbeError(f"no NVIDIA device {index} (found {count})")
        self.index = index
        self.id = f"nvidia:{index}"
        self._h = nvml.nvmlDeviceGetHandleByIndex(index)
        name = nvml.nvmlDeviceGetName(self._h)
        self.name = name.decode() if isinstance(name, bytes) else str(name)
        self.parent_uuid: str | None = None
        if mig is not None:  # one MIG instance of the GPU: a device of its own, named by its UUID
            try:
                parent = nvml.nvmlDeviceGetUUID(self._h)
                self.parent_uuid = parent.decode() if isinstance(parent, bytes) else str(parent)
            except Exception:
                pass
            try:
                self._h = nvml.nvmlDeviceGetMigDeviceHandleByIndex(self._h, mig)
            except Exception as e:
                raise ProbeError(f"no MIG instance {mig} on NVIDIA device {index}: {e}") from e
            self.mig, self.id, self.name = True, f"nvidia:{index}/mig{mig}", f"{self.name} MIG {mig}"
        try:
            uuid = nvml.nvmlDeviceGetUUID(self._h)
            self.uuid = uuid.decode() if isinstance(uuid, bytes) else str(uuid)
        except Exception:
            self.uuid = None

    @staticmethod
    def count(nvml: Any = None) -> int:
        try:
            if nvml is None:
                import pynvml as nvml  # type: ignore[no-redef]
            nvml.nvmlInit()
            return int(nvml.nvmlDeviceGetCount())
        except Exception:
            return 0

    def memory(self) -> DeviceMemory:
        m = self._nvml.nvmlDeviceGetMemoryInfo(self._h)
        return DeviceMemory(total=int(m.total), used=int(m.used), free=int(m.free))

    def processes(self) -> list[ProcessUse]:
        out: list[ProcessUse] = []
        for getter in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
            fn = getattr(self._nvml, getter, None)
            if fn is None:
                continue
            try:
                procs = fn(self._h)
            except Exception:
                continue
            for p in procs:
                used = getattr(p, "usedGpuMemory", None)
                out.append(ProcessUse(int(p.pid), int(used) if used is not None else None))
        return out

    def process_bytes(self, pids: Iterable[int]) -> int | None:
        return _sum_visible(self.processes(), pids)

    def child_env(self) -> dict[str, str]:
        # the UUID names the same GPU whatever CUDA's enumeration order is
        return {"CUDA_VISIBLE_DEVICES": self.uuid or str(self.index), "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}


# ---------------------------------------------------------------------------------- AMD


def import_amdsmi() -> Any | None:
    """`import amdsmi` without its noise: it prints to stdout and raises KeyError if absent."""
    if "amdsmi" in sys.modules:
        return sys.modules["amdsmi"]
    saved = None
    try:
        sys.stdout.flush()
        saved = os.dup(1)
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 1)
            with contextlib.redirect_stdout(io.StringIO()):
                import amdsmi  # type: ignore[import-not-found]
        return amdsmi
    except Exception:  # ImportError, KeyError, OSError from the loader
        sys.modules.pop("amdsmi", None)
        return None
    finally:
        if saved is not None:
            os.dup2(saved, 1)
            os.close(saved)


class AmdSmiProbe:
    kind = "amd"
    offload = True
    mig = False

    def __init__(self, index: int = 0, amdsmi: Any = None):
        amdsmi = amdsmi or import_amdsmi()
        if amdsmi is None:
            raise ProbeError("amdsmi is not available (ROCm's amd-smi library not found)")
        self._a = amdsmi
        try:
            amdsmi.amdsmi_init()
            handles = amdsmi.amdsmi_get_processor_handles()
        except Exception as e:
            raise ProbeError(f"AMD-SMI unavailable: {e}") from e
        if not 0 <= index < len(handles):
            raise ProbeError(f"no AMD device {index} (found {len(handles)})")
        self.index = index
        self._h = handles[index]
        try:
            self.name = str(amdsmi.amdsmi_get_gpu_asic_info(self._h).get("market_name") or "AMD GPU")
        except Exception:
            self.name = "AMD GPU"
        try:
            self.uuid: str | None = str(amdsmi.amdsmi_get_gpu_device_uuid(self._h)) or None
        except Exception:
            self.uuid = None

    @staticmethod
    def count(amdsmi: Any = None) -> int:
        amdsmi = amdsmi or import_amdsmi()
        if amdsmi is None:
            return 0
        try:
            amdsmi.amdsmi_init()
            return len(amdsmi.amdsmi_get_processor_handles())
        except Exception:
            return 0

    def memory(self) -> DeviceMemory:
        a = self._a
        vram = a.AmdSmiMemoryType.VRAM
        total = int(a.amdsmi_get_gpu_memory_total(self._h, vram))
        used = int(a.amdsmi_get_gpu_memory_usage(self._h, vram))
        return DeviceMemory(total=total, used=used, free=max(0, total - used))

    def processes(self) -> list[ProcessUse]:
        try:
            procs = self._a.amdsmi_get_gpu_process_list(self._h)
        except Exception:
            return []
        out = []
        for p in procs:
            if not isinstance(p, dict):  # older releases return handles
                try:
                    p = self._a.amdsmi_get_gpu_process_info(self._h, p)
                except Exception:
                    continue
            mem = p.get("memory_usage") or {}
            vram = mem.get("vram_mem") if isinstance(mem, dict) else None
            out.append(ProcessUse(int(p.get("pid", 0)), int(vram) if vram is not None else None))
        return out

    def process_bytes(self, pids: Iterable[int]) -> int | None:
        return _sum_visible(self.processes(), pids)

    def child_env(self) -> dict[str, str]:
        # ROCR picks the physical GPU (by UUID where known); HIP's index counts within what ROCR
        # left visible, so it is 0 (HIP=N on top of ROCR=N would name a device that is not there)
        return {"ROCR_VISIBLE_DEVICES": self.uuid or str(self.index), "HIP_VISIBLE_DEVICES": "0"}


# --------------------------------------------------------------------------------- host


def is_unified_memory() -> bool:
    """Jetson-style boards: the GPU shares host RAM, so the host probe is the truth."""
    return Path("/etc/nv_tegra_release").exists() or Path("/sys/module/tegra_fuse").exists()


class HostProbe:
    kind = "host"
    index = 0

    def __init__(self, offload: bool = False):
        import psutil

        self._psutil = psutil
        self.offload = offload
        self.name = "unified memory" if offload else "host RAM"

    def memory(self) -> DeviceMemory:
        vm = self._psutil.virtual_memory()
        return DeviceMemory(total=int(vm.total), used=int(vm.total - vm.available), free=int(vm.available))

    def processes(self) -> list[ProcessUse]:
        return []

    def process_bytes(self, pids: Iterable[int]) -> int | None:
        """RSS for a keeper and a single-process engine (llama-server): cheap, and exact enough,
        since the two share only a few library pages. PSS summed over the tree for engines with
        several processes (vLLM's server, engine core and workers share large libraries), where
        RSS would count the shared pages once per process. PSS reads every mapping
        (smaps_rollup: ~8 ms for a 256 MiB model, growing with size), so it is kept for the
        trees that need it."""
        pids = list(pids)
        use_pss = len(pids) > 2
        total = 0
        seen = False
        for pid in pids:
            try:
                p = self._psutil.Process(pid)
                if use_pss:
                    try:
                        total += int(p.memory_full_info().pss)
                    except (AttributeError, self._psutil.AccessDenied):
                        total += int(p.memory_info().rss)
                else:
                    total += int(p.memory_info().rss)
                seen = True
            except (self._psutil.NoSuchProcess, self._psutil.ZombieProcess):
                continue
        return total if seen else None

    def child_env(self) -> dict[str, str]:
        return {}


# --------------------------------------------------------------------------------- fake


@dataclass
class FakeProbe:
    """A device whose numbers tests set by hand."""

    total: int = 16 << 30
    used: int = 0
    per_pid: dict[int, int] = field(default_factory=dict)
    kind: str = "fake"
    index: int = 0
    name: str = "fake device"
    offload: bool = False
    visible: bool = True  # whether per-process numbers are shown

    def memory(self) -> DeviceMemory:
        used = self.used + sum(self.per_pid.values())
        return DeviceMemory(total=self.total, used=used, free=max(0, self.total - used))

    def processes(self) -> list[ProcessUse]:
        return [ProcessUse(p, b) for p, b in self.per_pid.items()] if self.visible else []

    def process_bytes(self, pids: Iterable[int]) -> int | None:
        return _sum_visible(self.processes(), pids)

    def child_env(self) -> dict[str, str]:
        return {}


# ------------------------------------------------------------------------------- detect


def detect(device: str = "auto") -> MemoryProbe:
    """The probe for a `--device` setting."""
    device = device.lower()
    if device == "cpu":
        return HostProbe(offload=False)
    kind, _, idx = device.partition(":")
    index = int(idx or 0)
    if kind == "nvidia":
        return NvmlProbe(index)
    if kind == "amd":
        return AmdSmiProbe(index)
    if kind != "auto":
        raise ProbeError(f"unknown device {device!r}")
    if is_unified_memory():
        return HostProbe(offload=True)
    for cls in (NvmlProbe, AmdSmiProbe):
        try:
            return cls(0)
        except ProbeError:
            continue
    return HostProbe(offload=False)


def all_probes() -> list[MemoryProbe]:
    """Every device found, for `swapper gpu`."""
    probes: list[MemoryProbe] = []
    for i in range(NvmlProbe.count()):
        probes.append(NvmlProbe(i))
    for i in range(AmdSmiProbe.count()):
        probes.append(AmdSmiProbe(i))
    probes.append(HostProbe(offload=is_unified_memory()))
    return probes
