"""Sizes and durations as people write them in configs and flags.

Sizes: IEC and SI units keep their real meaning (`450MiB` = 450 x 2^20, `20GB` = 20 x 10^9),
a bare number is bytes, and `90%` is a share of the device (resolved later, when the device's
total is known). Durations: a bare number is seconds; `500ms`, `30s`, `5m`, `1h` also work.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
    "t": 1000**4, "tb": 1000**4,
    "ki": 1 << 10, "kib": 1 << 10, "mi": 1 << 20, "mib": 1 << 20, "gi": 1 << 30, "gib": 1 << 30,
    "ti": 1 << 40, "tib": 1 << 40,
}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")
_DUR_UNITS = {"": 1.0, "s": 1.0, "ms": 1e-3, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}
_DUR_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


@dataclass(frozen=True)
class SizeSpec:
    """An absolute byte count or a share of a device's total memory."""

    bytes: int | None = None
    fraction: float | None = None

    def resolve(self, total: int) -> int:
        if self.fraction is not None:
            return int(total * self.fraction)
        return int(self.bytes or 0)

    def __str__(self) -> str:
        if self.fraction is not None:
            return f"{self.fraction * 100:g}%"
        return format_bytes(self.bytes or 0)


def parse_size(value: object) -> int:
    """Bytes from `450MiB`, `20GB`, `1024` (no percentages)."""
    spec = parse_size_spec(value, allow_percent=False)
    assert spec.bytes is not None
    return spec.bytes


def parse_size_spec(value: object, allow_percent: bool = True) -> SizeSpec:
    if isinstance(value, bool):
        raise ValueError(f"expected a size, got {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"size must not be negative, got {value!r}")
        return SizeSpec(bytes=int(value))
    if not isinstance(value, str):
        raise ValueError(f"expected a size such as 512MiB or 20GB, got {value!r}")
    s = value.strip()
    if s.endswith("%"):
        if not allow_percent:
            raise ValueError(f"a share of the device is not allowed here, got {value!r}")
        try:
            pct = float(s[:-1])
        except ValueError:
            raise ValueError(f"expected a percentage such as 90%, got {value!r}") from None
        if not 0 < pct <= 100:
            raise ValueError(f"percentage must be in (0, 100], got {value!r}")
        return SizeSpec(fraction=pct / 100.0)
    m = _SIZE_RE.match(s)
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"expected a size such as 512MiB, 20GB or 90%, got {value!r}")
    return SizeSpec(bytes=int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]))


def parse_duration(value: object) -> float:
    """Seconds from `500ms`, `30s`, `5m`, `1h` or a bare number of seconds."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration, got {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"duration must not be negative, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f"expected a duration such as 30s or 5m, got {value!r}")
    m = _DUR_RE.match(value)
    if not m or m.group(2).lower() not in _DUR_UNITS:
        raise ValueError(f"expected a duration such as 500ms, 30s, 5m or 1h, got {value!r}")
    return float(m.group(1)) * _DUR_UNITS[m.group(2).lower()]


def format_bytes(n: float) -> str:
    """Human-readable IEC bytes for messages and tables."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
