"""Markdown tables and the pieces every section hands back to the runner."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table (numbers right-aligned)."""
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|")

    def numeric(i: int) -> bool:
        vals = [str(r[i]) for r in rows if i < len(r)]
        vals = [v for v in vals if v not in ("", "n/a", "–")]
        return bool(vals) and all(v[:1].isdigit() or v[:1] in "-+" for v in vals)

    align = ["---:" if numeric(i) else "---" for i in range(len(headers))]
    out = ["| " + " | ".join(cell(h) for h in headers) + " |", "| " + " | ".join(align) + " |"]
    out += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(out)


@dataclass
class Goal:
    """One claim from the issue, checked against this run."""

    name: str
    target: str
    measured: str
    met: bool | None  # None: not measurable in this run

    @property
    def verdict(self) -> str:
        return {True: "met", False: "**not met**", None: "n/a"}[self.met]


@dataclass
class Section:
    title: str
    intro: str = ""
    tables: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    goals: list[Goal] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        parts = [f"## {self.title}"]
        if self.intro:
            parts.append(self.intro)
        parts += self.tables
        if self.notes:
            parts.append("\n".join(f"- {n}" for n in self.notes))
        return "\n\n".join(parts)


def goals_table(sections: Sequence[Section]) -> str:
    rows = [(g.name, g.target, g.measured, g.verdict) for s in sections for g in s.goals]
    return md_table(["goal", "target", "measured", "verdict"], rows)
