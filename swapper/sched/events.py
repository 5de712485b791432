"""What the decision core hears (events) and what it asks for (effects).

Events come from requests (arrived, left, released), commands (unload, pin, catalog, shutdown),
the effects runner reporting back (loaded, load failed, stopped, woke, exited, measured) and
time and the probe (tick with a reading). Effects are what the runner does at the edge: start,
stop, sleep or wake a child, grant or fail a waiter, prefetch files, learn a footprint, report a
swap event. The core never touches the world itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from ..catalog import ModelEntry
from .errors import LoadError, SchedulerError
from .ledger import Reading
from .lifecycle import Instance

# ------------------------------------------------------------------------------ events


@dataclass(frozen=True)
class Arrived:
    """A request (counts=True) or a load command (counts=False) wants `model` resident."""

    waiter: int
    model: str
    estimate: int  # bytes the estimator expects (ignored once measured)
    counts: bool = True
    bounded: bool = True
    reason: str = "demand"
    autoload: bool = True
    refuse_loaded: bool = False  # admin load: "already loaded" is an answer
    refuse_loading: bool = False  # ... and so is "already loading" (unless the caller waits)
    overhead: int = 0  # of `estimate`, the per-process part every device the child touches pays


@dataclass(frozen=True)
class Left:
    """A waiter's client went away before it was granted."""

    waiter: int
    model: str


@dataclass(frozen=True)
class Released:
    """A granted request finished (or its grant found nobody waiting)."""

    model: str


@dataclass(frozen=True)
class Loaded:
    model: str
    instance: Instance
    seconds: float
    process_bytes: int | None  # the probe's per-process reading right after, if shown
    device_delta: int | None = None  # device used memory after minus before (serial loads)
    reading: Reading | None = None  # the device right after the load
    readings: dict[str, Reading] | None = None  # per device, on a node with several
    per_device: dict[str, int] | None = None  # the child's bytes on each device, where shown


@dataclass(frozen=True)
class LoadFailedEvent:
    model: str
    error: LoadError
    seconds: float


@dataclass(frozen=True)
class Woke:
    model: str
    seconds: float
    process_bytes: int | None
    reading: Reading | None = None
    readings: dict[str, Reading] | None = None


@dataclass(frozen=True)
class Stopped:
    model: str
    slept: bool  # the engine kept running with its device memory released
    seconds: float
    reading: Reading | None = None  # the device right after the stop
    readings: dict[str, Reading] | None = None


@dataclass(frozen=True)
class Exited:
    """A child exited on its own (crash, OOM kill), reported as soon as it is known."""

    model: str
    instance: Instance
    code: int | None


@dataclass(frozen=True)
class Measured:
    """The probe's per-process reading of a child after its first request."""

    model: str
    instance: Instance
    bytes: int | None


@dataclass(frozen=True)
class Tick:
    """Time passed; `reading` is the probe's latest view of the device (None: unchanged)."""

    reading: Reading | None = None
    seen: dict[str, int] = field(default_factory=dict)  # starting children's per-process bytes
    readings: dict[str, Reading] | None = None  # per device, on a node with several


@dataclass(frozen=True)
class Unload:
    waiter: int  # who to tell when the model is stopped
    model: str
    force: bool
    reason: str = "manual"
    refuse_if_unloaded: bool = False


@dataclass(frozen=True)
class SetPinned:
    model: str
    pinned: bool


@dataclass(frozen=True)
class CatalogChanged:
    entries: Sequence[ModelEntry]
    eager: frozenset[str] = frozenset()  # preloaded models: restart at once after a change


@dataclass(frozen=True)
class Shutdown:
    drain_timeout: float


Event = (Arrived | Left | Released | Loaded | LoadFailedEvent | Woke | Stopped | Exited | Measured
         | Tick | Unload | SetPinned | CatalogChanged | Shutdown)

# ----------------------------------------------------------------------------- effects


@dataclass(frozen=True)
class Start:
    model: str
    entry: ModelEntry
    reserved: int
    measure_device: bool  # read the device's used memory before and after (serial loads)
    placement: dict[str, float] = field(default_factory=dict)  # device id -> share of `reserved`


@dataclass(frozen=True)
class Stop:
    model: str
    instance: Instance | None
    entry: ModelEntry
    sleep: bool  # release device memory but keep the engine (vLLM sleep mode)


@dataclass(frozen=True)
class Wake:
    model: str
    instance: Instance
    entry: ModelEntry


@dataclass(frozen=True)
class Grant:
    waiter: int
    model: str
    instance: Instance
    waited: float
    counts: bool


@dataclass(frozen=True)
class Fail:
    waiter: int
    error: SchedulerError


@dataclass(frozen=True)
class Done:
    """An unload command's model is stopped (or there was nothing to stop)."""

    waiter: int


@dataclass(frozen=True)
class Prefetch:
    entry: ModelEntry


@dataclass(frozen=True)
class Learn:
    entry: ModelEntry
    bytes: int


@dataclass(frozen=True)
class Measure:
    """Read a child's per-process use after its first request (the KV cache is allocated)."""

    model: str
    instance: Instance


@dataclass(frozen=True)
class Report:
    """A swap event for the log, metrics and the status page."""

    model: str
    action: str  # load | evict | sleep | wake | unload | fail | exit
    reason: str
    bytes: int = 0
    seconds: float = 0.0
    detail: str = ""


@dataclass(frozen=True)
class CancelStarts:
    """Shutdown: cancel loads in progress (the launcher kills what it started)."""


Effect = Start | Stop | Wake | Grant | Fail | Done | Prefetch | Learn | Measure | Report | CancelStarts
