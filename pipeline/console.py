"""What comb says besides its results, and how it lays them out: warnings and notes on standard
error (one helper each), byte sizes and rates (formatted by ``catalog.units``: binary units
everywhere, bars and summaries alike), tables and JSON documents on standard output (one line
each, README.md "JSON output"). Used by the jobs and the CLI alike; result tables of any size
are ``pipeline.cli.output``'s, progress bars ``pipeline.cli.progress``'s."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from catalog.store.locks import LockInfo
from catalog.units import format_bytes

if TYPE_CHECKING:
    from catalog.repo import Repository


def warn(msg: str, loud: bool = False) -> None:
    """``comb: warning: MSG`` on standard error (``loud``: ``WARNING``, for what may have
    gone wrong unseen)."""
    print(f"comb: {'WARNING' if loud else 'warning'}: {msg}", file=sys.stderr)


def note(msg: str) -> None:
    print(f"comb: note: {msg}", file=sys.stderr)


def warn_damaged(repo: Repository) -> None:
    """Damaged point documents are skipped, never silently: one warning line each."""
    for msg in repo.damaged:
        warn(f"skipping {msg}")


def waiting(blocker: object) -> None:
    """Said once when a lock waits for another (``catalog.store.locks``' ``on_wait``)."""
    if isinstance(blocker, LockInfo):
        print(f"comb: waiting for the lock of {blocker.describe()}", file=sys.stderr)


def human_bytes(n: float) -> str:
    """A byte count as the commands print it: one decimal (``1.5 GiB``; ``catalog.units``)."""
    return format_bytes(n, decimals=1)


def human_rate(n_bytes: float, seconds: float) -> str:
    """Bytes per second in binary units (``512.0 MiB/s``)."""
    return f"{human_bytes(n_bytes / seconds if seconds > 0 else 0.0)}/s"


def table_row(values: Sequence[str], widths: Sequence[int]) -> str:
    """One line of a table: columns padded to ``widths``, two spaces apart, no trailing ones."""
    return "  ".join(v.ljust(w) for v, w in zip(values, widths, strict=False)).rstrip()


def print_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(head)]
    for row in (head, *rows):
        print(table_row(row, widths))


def json_value(v: Any) -> Any:
    """What ``json`` does not write by itself: a whole decimal (DuckDB's HUGEINT, e.g. a
    ``sum()``) as an integer and another decimal as a number, bytes as hex, anything else (a
    time) as text."""
    if isinstance(v, Decimal):
        return int(v) if v.is_finite() and v == v.to_integral_value() else float(v)
    if isinstance(v, bytes):
        return v.hex()
    return str(v)


def print_json(obj: Any) -> None:
    """One JSON document on one line (keys sorted), so a command that prints several (``backup``
    of several disks) prints JSON Lines."""
    print(json.dumps(obj, sort_keys=True, default=json_value))
