"""The scheduler's knobs (filled from swapper's settings by `app.scheduler_config`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..units import SizeSpec


@dataclass(frozen=True)
class DeviceLimits:
    """One device's own budget and reserve (None: the node-wide setting)."""

    budget: SizeSpec | None = None
    reserve: int | None = None


@dataclass
class SchedulerConfig:
    budget: SizeSpec = field(default_factory=lambda: SizeSpec(fraction=0.9))
    reserve: int = 0
    host_budget: SizeSpec = field(default_factory=lambda: SizeSpec(bytes=16 << 30))
    max_models: int = 0
    queue_size: int = 64
    queue_timeout: float = 300.0
    max_wait: float = 60.0
    idle_ttl: float = 0.0
    drain_timeout: float = 30.0
    backoff_base: float = 1.0
    backoff_max: float = 60.0
    crash_window: float = 60.0  # a crash this soon after a post-crash reload is a crash loop
    settle: float = 2.0  # how long the probe may lag behind a stop before more is evicted
    prefetch: bool = True
    devices: dict[str, DeviceLimits] = field(default_factory=dict)  # per device id ("nvidia:1")
