"""Printing figures: plain fixed-width tables, and targets judged as met / not met.

A benchmark never asserts: a missed target is a printed line, not an exit code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

KIB = 1024
MIB = 1024 * 1024


def mib(n: float) -> str:
    return f"{n / MIB:.1f}"


def table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]], left: int = 1) -> str:
    """The first ``left`` columns left-aligned, the others right-aligned."""
    cells = [[str(h) for h in header]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def line(r: list[str]) -> str:
        parts = [
            c.ljust(w) if i < left else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    out = [f"== {title} ==", line(cells[0]), line(["-" * w for w in widths])]
    out += [line(r) for r in cells[1:]]
    return "\n".join(out)


@dataclass(frozen=True)
class Target:
    """One figure against its limit: ``value op limit`` (op is "<=" or ">=")."""

    name: str
    value: float | None
    op: str
    limit: float
    unit: str = ""
    note: str = ""

    @property
    def status(self) -> str:
        if self.value is None:
            return "n/a"
        ok = self.value <= self.limit if self.op == "<=" else self.value >= self.limit
        return "met" if ok else "NOT MET"

    def row(self) -> list[str]:
        value = "-" if self.value is None else _num(self.value)
        return [
            self.name,
            f"{value} {self.unit}".strip(),
            f"{self.op} {_num(self.limit)}",
            self.status,
            self.note,
        ]

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": self.value,
            "op": self.op,
            "limit": self.limit,
            "unit": self.unit,
            "status": self.status,
        }


def _num(x: float) -> str:
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def targets_table(targets: Sequence[Target]) -> str:
    return table(
        "targets",
        ["target", "value", "limit", "status", "note"],
        [t.row() for t in targets],
    )


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b
