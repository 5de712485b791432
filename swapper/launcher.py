"""The process edge: turns the scheduler's decisions into child servers.

Implements the scheduler's `Launcher` protocol with a backend per engine (argv, env, health
route, sleep/wake) and `ChildProcess` (spawn, health poll, stop). Each child gets a free
loopback port and a private working directory under the state dir, removed when it stops or
exits on its own. Backends with `serial_start` (vLLM: each cold start sizes its KV cache from
the device's free memory) are started one at a time: the scheduler decides that
(`serial_start()` tells it which entries need it); the launcher itself holds no lock.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Callable

import aiohttp

from . import backends
from .backends.base import Backend
from .catalog import ModelEntry
from .config import Settings
from .device_set import DeviceGroup
from .gpu import MemoryProbe, probe_id
from .prefetch import Prefetcher
from .process import ChildExited, ChildProcess, free_port
from .scheduler import LoadError

log = logging.getLogger("swapper.launcher")


@dataclass
class ChildInstance:
    """A running child: where to send requests and how to reach its processes."""

    entry: ModelEntry
    backend: Backend
    process: ChildProcess
    port: int
    workdir: str
    base_url: str = field(init=False)

    def __post_init__(self) -> None:
        self.base_url = f"http://127.0.0.1:{self.port}"

    def pids(self) -> list[int]:
        return self.process.pids()

    def process_alive(self) -> bool:
        return self.process.returncode is None

    async def wait_exit(self, timeout: float) -> bool:
        """True once the child has exited (its keeper reaped), waiting at most `timeout`."""
        try:
            await asyncio.wait_for(self.process.exited.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True


class ProcessLauncher:
    def __init__(self, settings: Settings, probe: MemoryProbe | list[MemoryProbe],
                 session_factory: Callable[[], aiohttp.ClientSession], prefetcher: Prefetcher | None = None):
        self.settings = settings
        probes = list(probe) if isinstance(probe, (list, tuple)) else [probe]
        self.probe = probes[0]
        self.probes = {probe_id(p): p for p in probes}
        self._session_factory = session_factory
        self._backends: dict[str, Backend] = {}
        self.children: dict[str, ChildInstance] = {}
        self.prefetcher = prefetcher
        self.stop_grace = 10.0

    @property
    def session(self) -> aiohttp.ClientSession:
        return self._session_factory()

    def backend(self, engine: str) -> Backend:
        b = self._backends.get(engine)
        if b is None:
            b = self._backends[engine] = backends.get(engine, self.settings)
        return b

    def _workdir(self, entry: ModelEntry) -> str:
        root = self.settings.state_path / "run"
        root.mkdir(parents=True, exist_ok=True)
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in entry.id)[:64]
        return tempfile.mkdtemp(prefix=f"{safe}-", dir=root)

    def serial_start(self, entry: ModelEntry) -> bool:
        """Whether this entry's engine must not cold-start beside another start on the device."""
        try:
            return bool(self.backend(entry.engine).serial_start)
        except Exception:
            return False

    async def start(self, entry: ModelEntry, reserved: int, on_exit: Callable[[int | None], None], *,
                    placement: dict[str, float] | None = None) -> ChildInstance:
        try:
            backend = self.backend(entry.engine)
            group = self.group(placement)
        except Exception as e:  # unknown engine or device
            raise LoadError(str(e)) from e
        return await self._start(entry, backend, reserved, on_exit, group)

    def group(self, placement: dict[str, float] | None) -> DeviceGroup:
        """The devices a child sees (only those), in the scheduler's split proportions."""
        if not placement:
            return DeviceGroup([self.probe], (1.0,))
        missing = [d for d in placement if d not in self.probes]
        if missing:
            raise ValueError(f"device(s) {', '.join(missing)} not planned")
        return DeviceGroup([self.probes[d] for d in placement], tuple(placement.values()))

    async def _start(self, entry: ModelEntry, backend: Backend, reserved: int,
                     on_exit: Callable[[int | None], None], group: DeviceGroup) -> ChildInstance:
        workdir = ""
        try:
            port = free_port()
            workdir = self._workdir(entry)
            # off the event loop: a start may read model headers (GGUF chat template, config.json)
            spec = await asyncio.to_thread(backend.start_spec, entry, port, group, reserved, workdir)
        except Exception as e:  # engine not installed, bad model entry, ...
            if workdir:
                shutil.rmtree(workdir, ignore_errors=True)
            raise LoadError(str(e)) from e
        if self.prefetcher is not None:
            self.prefetcher.forget(entry)
        env = {**os.environ, **spec.env}

        def exited(code: int | None) -> None:  # a crash: nothing else will clean up after it
            self._cleanup(inst)
            on_exit(code)

        proc = ChildProcess(entry.id, spec.argv, env=env, cwd=workdir, grace=self.stop_grace, on_exit=exited)
        inst = ChildInstance(entry, backend, proc, port, workdir)
        try:
            await proc.start()
            await proc.wait_healthy(inst.base_url + spec.health_path, self.settings.load_timeout, self.session)
        except ChildExited as e:
            self._cleanup(inst)
            raise LoadError(f"{entry.engine} exited during start with status {e.code}", e.code, e.tail) from None
        except asyncio.TimeoutError:
            await proc.stop()
            self._cleanup(inst)
            raise LoadError(f"not healthy within the load timeout ({self.settings.load_timeout:g}s)",
                            proc.returncode, list(proc.tail)) from None
        except OSError as e:  # the keeper or interpreter could not be started
            self._cleanup(inst)
            raise LoadError(f"cannot start {entry.engine}: {e}") from None
        except BaseException:  # cancelled (shutdown): never leave a half-started child
            await asyncio.shield(proc.stop(grace=2.0))
            self._cleanup(inst)
            raise
        self.children[entry.id] = inst
        return inst

    async def stop(self, instance: ChildInstance, entry: ModelEntry) -> None:
        try:
            await instance.process.stop()
        finally:
            self._cleanup(instance)
            if self.prefetcher is not None:
                self.prefetcher.evicted(entry)

    def _cleanup(self, inst: ChildInstance) -> None:
        if self.children.get(inst.entry.id) is inst:
            del self.children[inst.entry.id]
        shutil.rmtree(inst.workdir, ignore_errors=True)

    def can_sleep(self, entry: ModelEntry) -> bool:
        return entry.sleep and self.backend(entry.engine).supports_sleep

    async def sleep(self, instance: ChildInstance, entry: ModelEntry) -> None:
        await instance.backend.sleep(self.session, instance.base_url)

    async def wake(self, instance: ChildInstance, entry: ModelEntry) -> None:
        await instance.backend.wake(self.session, instance.base_url)

    def prefetch(self, entry: ModelEntry) -> None:
        if self.prefetcher is not None:
            self.prefetcher.prefetch(entry)

    def kill_all(self) -> None:
        """Synchronous last resort (atexit): no child may outlive swapper."""
        for inst in list(self.children.values()):
            inst.process.kill_now()
