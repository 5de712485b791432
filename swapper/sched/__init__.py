"""The scheduler, as a package: lifecycle, decision core, planner, ledger and effects runner.

| module | concern |
|---|---|
| `lifecycle.py` | states, the table of legal transitions, per-state records, `transition()` |
| `events.py` | the events the core hears and the effects it asks for |
| `core.py` | the decision core: one handler per event (pure, synchronous) |
| `admission.py` | the core's decisions after every event: grants, starts, evictions, drains, TTL |
| `planner.py` | `plan_eviction`, a pure function |
| `placement.py` | which device(s) a model loads on and its victims there, a pure function |
| `devices.py` | the core's devices: one ledger and reading each; the glue to placement |
| `ledger.py` | capacity, reservations and room, from numbers and a probe reading (per device) |
| `runner.py` | `Scheduler`: commands (acquire, load, unload, pin, catalog), the read-only view, ticks |
| `effects.py` | the effects runner at the edge: launcher tasks, probe reads, futures; outcomes fed back as events |
| `errors.py` | domain errors (no HTTP codes: `swapper/errors.py` maps them) |
| `settings.py` | `SchedulerConfig`, the knobs |
"""

from .core import Core
from .settings import SchedulerConfig
from .errors import (AlreadyLoaded, IllegalTransition, InsufficientMemory, LoadError, LoadFailed, NotLoaded,
                     Pinned, QueueFull, QueueTimeout, SchedulerError, ShuttingDown, UnknownModel, Unloaded)
from .ledger import Reading
from .lifecycle import COUNTS_RESIDENT, HOLDS_DEVICE, LOADED, SERVING, TRANSITIONS, Instance, Model, State, Waiter
from .planner import Candidate, plan_eviction
from .effects import Launcher, Lease, SwapEvent
from .runner import Scheduler

__all__ = [
    "AlreadyLoaded", "COUNTS_RESIDENT", "Candidate", "Core", "HOLDS_DEVICE", "IllegalTransition", "Instance",
    "InsufficientMemory", "LOADED", "Launcher", "Lease", "LoadError", "LoadFailed", "Model", "NotLoaded", "Pinned",
    "QueueFull", "QueueTimeout", "Reading", "SERVING", "Scheduler", "SchedulerConfig", "SchedulerError",
    "ShuttingDown", "State", "SwapEvent", "TRANSITIONS", "UnknownModel", "Unloaded", "Waiter", "plan_eviction",
]
