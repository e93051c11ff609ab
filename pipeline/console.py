"""What comb says besides its results, and how it lays them out: warnings and notes on standard
error (one helper each), byte sizes (formatted by ``catalog.units``), tables and JSON on
standard output. Used by the jobs and the CLI alike; result tables of any size are
``pipeline.cli.output``'s."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
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


def table_row(values: Sequence[str], widths: Sequence[int]) -> str:
    """One line of a table: columns padded to ``widths``, two spaces apart, no trailing ones."""
    return "  ".join(v.ljust(w) for v, w in zip(values, widths, strict=False)).rstrip()


def print_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(head)]
    for row in (head, *rows):
        print(table_row(row, widths))


def print_json(obj: Any, pretty: bool = False) -> None:
    """One JSON document (keys sorted; ``pretty``: indented)."""
    print(json.dumps(obj, indent=2 if pretty else None, sort_keys=True, default=str))
