"""Every version of the files whose name matches a pattern, across a history (``comb find``):
computed in Arrow over a ``FileHistory`` (``catalog.analytics.file_history``), matching names
first, so the cost is one pass of the pattern over the history's names plus work in proportion
to the versions found.

A version is a change row (``added`` or ``modified``) of a point: the file as it was from that
point's time (``first_seen``) until the next change row of the same path in the same source
(``until``: a later version or its removal; none: it is still there). ``points`` counts the live
points of the source in that span; a version no live point holds is left out.

Patterns are shell-style: ``*`` any run of characters, ``?`` one, ``[...]`` one of a set
(``[!...]`` none of it), ``\\`` makes the next character itself. A pattern without ``/``
matches the name of a file (then ``*`` and ``?`` never cross a ``/``), one with ``/`` the whole
path from the volume (``/part1/etc/*``). A set RE2 cannot take (``[z-a]``) is a usage error.

Owns the matching and the versions. Must not: read the repository, or print.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from catalog.analytics.file_history import FileHistory
from catalog.errors import UsageError


def pattern_regex(pattern: str, whole_path: bool) -> str:
    """The body of an RE2 expression (not anchored) that matches what the shell-style
    ``pattern`` matches (see the module), over a name (``whole_path`` False) or a path."""
    some = "." if whole_path else "[^/]"
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        i += 1
        end = _class_end(pattern, i) if c == "[" else -1
        if c == "\\" and i < len(pattern):  # an escaped character is itself
            out.append(re.escape(pattern[i]))
            i += 1
        elif c == "*":
            out.append(some + "*")
        elif c == "?":
            out.append(some)
        elif end > 0:
            body, i = pattern[i:end], end + 1
            negate = body.startswith("!")
            members = "".join("\\" + m if m in "\\]^[" else m for m in body[negate:])
            out.append(f"[^{members}{'' if whole_path else '/'}]" if negate else f"[{members}]")
        else:
            out.append(re.escape(c))
    return "".join(out)


def _class_end(pattern: str, i: int) -> int:
    """Where the set that starts before ``i`` ends (its ``]``), or -1: not a set."""
    j = i + (pattern[i : i + 1] == "!")
    j += pattern[j : j + 1] == "]"  # a "]" first is a member
    return pattern.find("]", j)


def matching(rows: pa.Table, pattern: str, ignore_case: bool) -> pa.Table:
    """The rows whose path matches. The pattern's literal head and tail (before its first and
    after its last wildcard) pick the candidates first, by plain string tests; the expression
    is tried on those only: on the whole path, or on each path as a suffix after a "/" (one
    pass), then exactly on the names of the few rows that passed."""
    cut = [pattern.find(c) for c in "*?[\\" if c in pattern]
    head = pattern[: min(cut)] if cut else pattern
    tail = pattern[max(pattern.rfind(c) for c in "*?]\\") + 1 :]
    if "/" in pattern:
        rows = rows.append_column("_shown", _shown(rows))
        rows = _keep(rows, "_shown", pc.starts_with, head, ignore_case)
        rows = _keep(rows, "_shown", pc.ends_with, tail, ignore_case)
        regex = "(?s)^" + pattern_regex(pattern, True) + "$"
        hit = pc.match_substring_regex(rows.column("_shown"), regex, ignore_case=ignore_case)
        return rows.filter(hit).drop_columns(["_shown"])
    rows = _keep(rows, "path_text", pc.ends_with, tail, ignore_case)
    rows = _keep(rows, "path_text", pc.match_substring, "/" + head, ignore_case)
    body = pattern_regex(pattern, False)
    rows = rows.filter(
        pc.match_substring_regex(rows.column("path_text"), f"(?s)/{body}$", ignore_case=ignore_case)
    )
    names = pc.replace_substring_regex(rows.column("path_text"), "(?s)^.*/", "")
    return rows.filter(pc.match_substring_regex(names, f"(?s)^{body}$", ignore_case=ignore_case))


def _keep(rows: pa.Table, column: str, test: Any, literal: str, ignore_case: bool) -> pa.Table:
    """The rows whose ``column`` passes a plain string ``test`` with ``literal`` (all: "")."""
    if not literal or not rows.num_rows:
        return rows
    return rows.filter(test(rows.column(column), literal, ignore_case=ignore_case))


def versions(
    history: FileHistory,
    pattern: str,
    ignore_case: bool = False,
    source: str | None = None,
    since: datetime | None = None,
) -> list[dict[str, Any]]:
    """The versions of the matching files (``source``, ``path``, ``kind``, ``size``, ``mtime``,
    ``first_point``, ``first_seen``, ``change``, ``until``, ``points``), by source, path and
    first seen; with ``source``, of that source only; with ``since``, those held at or after
    it."""
    try:
        rows = matching(history.rows, pattern, ignore_case)
    except pa.ArrowInvalid as err:  # (a set RE2 refuses, such as [z-a])
        raise UsageError(f"bad pattern {pattern!r}: {str(err).splitlines()[0]}") from None
    points = history.points
    at = pc.index_in(rows.column("point_id"), value_set=points.column("point_id"))
    rows = rows.filter(pc.is_valid(at))
    for name in ("source", "time"):
        rows = rows.append_column(name, points.column(name).take(pc.drop_null(at)))
    if source is not None:
        rows = rows.filter(pc.equal(rows.column("source"), source))
    if not rows.num_rows:
        return []
    rows = rows.sort_by(
        [(k, "ascending") for k in ("source", "volume", "path", "time", "point_id")]
    )
    same = _same_as_next(rows, ["source", "volume", "path"])
    times = rows.column("time").cast(pa.int64()).to_numpy()
    until = np.where(same, np.append(times[1:], 0), 0)  # (same: the version has an end)
    live_points = points.filter(pc.invert(points.column("forgotten")))
    held = _held(rows, times, until, same, live_points)
    keep = (held > 0) & (rows.column("change").to_numpy(zero_copy_only=False) != "removed")
    if since is not None:
        cut = int(since.timestamp() * 1_000_000)
        keep &= ~same | (until > cut)
    at = np.flatnonzero(keep)
    kept = rows.take(at)
    ns = kept.column("mtime_ns").to_numpy()
    mtime = np.sign(ns) * (np.abs(ns) // 1000)  # (toward zero, as the views' SQL rounds)
    bounded = same[at]
    out = pa.table(
        {
            "source": kept.column("source"),
            "path": _shown(kept),
            "kind": kept.column("kind"),
            "size": kept.column("size"),
            "mtime": pa.array(mtime, pa.timestamp("us")),
            "first_point": kept.column("point_id"),
            "first_seen": kept.column("time"),
            "change": kept.column("change"),
            "until": pa.array(until[at], pa.timestamp("us", tz="UTC"), mask=~bounded),
            "points": pa.array(held[at], pa.int64()),
        }
    ).to_pylist()
    out.sort(key=lambda v: (v["source"], v["path"], v["first_seen"]))
    return out


def _shown(rows: pa.Table) -> pa.ChunkedArray:
    """``/volume/path`` as text."""
    return pc.binary_join_element_wise("/", rows.column("volume"), rows.column("path_text"), "")


def _same_as_next(rows: pa.Table, keys: list[str]) -> np.ndarray:
    """Per row of sorted ``rows``: does the next row have the same ``keys``?"""
    n = rows.num_rows
    same = np.ones(max(n - 1, 0), dtype=bool)
    for k in keys:
        col = rows.column(k).combine_chunks()
        same &= pc.equal(col.slice(0, n - 1), col.slice(1)).to_numpy(zero_copy_only=False)
    return np.append(same, False)


def _held(
    rows: pa.Table, first: np.ndarray, until: np.ndarray, bounded: np.ndarray, live: pa.Table
) -> np.ndarray:
    """Per version: the live points of its source with a time in [first, until)."""
    held = np.zeros(rows.num_rows, dtype=np.int64)
    sources = rows.column("source").to_numpy(zero_copy_only=False)
    live_src = live.column("source").to_numpy(zero_copy_only=False)
    live_t = live.column("time").cast(pa.int64()).to_numpy()
    for name in set(sources.tolist()):
        t = np.sort(live_t[live_src == name])
        mine = sources == name
        lo = np.searchsorted(t, first[mine], side="left")
        hi = np.where(bounded[mine], np.searchsorted(t, until[mine], side="left"), len(t))
        held[mine] = hi - lo
    return held
