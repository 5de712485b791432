"""Small statistics: percentiles, medians with their spread, and the fewest loads possible.

Ratios are what the benchmark reports (absolute times drift on shared machines), so each ratio
is taken within one repetition, where all targets ran back to back, and then summarised over
the repetitions as a median with its range.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Iterable, Sequence


def percentile(xs: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]; nan for no data."""
    v = sorted(x for x in xs if x is not None)
    if not v:
        return math.nan
    k = (len(v) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def median(xs: Iterable[float]) -> float:
    return percentile([x for x in xs if x is not None and not math.isnan(x)], 50)


@dataclass(frozen=True)
class Spread:
    """A median and the range it came from."""

    med: float
    lo: float
    hi: float
    n: int

    @classmethod
    def of(cls, xs: Iterable[float]) -> Spread:
        v = [x for x in xs if x is not None and not math.isnan(x)]
        if not v:
            return cls(math.nan, math.nan, math.nan, 0)
        return cls(median(v), min(v), max(v), len(v))

    def fmt(self, digits: int = 2, unit: str = "") -> str:
        if self.n == 0:
            return "n/a"
        f = f"{{:.{digits}f}}"
        if self.n == 1:
            return f.format(self.med) + unit
        return f"{f.format(self.med)}{unit} ({f.format(self.lo)}–{f.format(self.hi)})"


def ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(a) and not math.isnan(b) else math.nan


def fewest_loads(groups: Sequence[Sequence[str]], capacity: int) -> int:
    """The fewest loads that serve `groups` in order with at most `capacity` models resident.

    Exact offline optimum by dynamic programming over the set of resident models (Belady's
    algorithm is optimal for a fixed order; this also lets each concurrent group be served in
    any order, as a server may). Requests within a group are served one after another.
    """
    states: dict[frozenset[str], int] = {frozenset(): 0}
    for group in groups:
        best: dict[frozenset[str], int] = {}
        for order in set(itertools.permutations(group)):
            cur = dict(states)
            for m in order:
                nxt: dict[frozenset[str], int] = {}
                for s, cost in cur.items():
                    if m in s:
                        options = [(s, cost)]
                    elif len(s) < capacity:
                        options = [(s | {m}, cost + 1)]
                    else:
                        options = [((s - {v}) | {m}, cost + 1) for v in s]
                    for ns, c in options:
                        if c < nxt.get(ns, math.inf):
                            nxt[ns] = c
                cur = nxt
            for s, c in cur.items():
                if c < best.get(s, math.inf):
                    best[s] = c
        states = best
    return min(states.values())


def belady_loads(seq: Sequence[str], capacity: int) -> int:
    """Belady's MIN for one fixed order: evict the model needed furthest in the future."""
    resident: set[str] = set()
    loads = 0
    for i, m in enumerate(seq):
        if m in resident:
            continue
        loads += 1
        if len(resident) >= capacity:
            def next_use(x: str) -> int:
                for j in range(i + 1, len(seq)):
                    if seq[j] == x:
                        return j
                return len(seq) + 1
            resident.remove(max(resident, key=next_use))
        resident.add(m)
    return loads


def lru_misses(seq: Sequence[str], capacity: int) -> list[tuple[int, str | None]]:
    """(index, victim) of every miss under LRU with `capacity` residents (victim None: no eviction)."""
    order: list[str] = []
    out: list[tuple[int, str | None]] = []
    for i, m in enumerate(seq):
        if m in order:
            order.remove(m)
            order.append(m)
            continue
        victim = order.pop(0) if len(order) >= capacity else None
        out.append((i, victim))
        order.append(m)
    return out
