"""``comb points``: list the recovery points (a table, or JSON), optionally only those with
given tags, since a date, or the last N."""

from __future__ import annotations

import argparse
from dataclasses import asdict
from datetime import datetime
from typing import Any

from catalog.errors import UsageError
from catalog.repo import Repository
from catalog.store.points import RecoveryPoint

from ..console import human_bytes, print_json, print_table, warn_damaged
from . import Subparsers, command
from .analytics_cmd import parse_since

MAX_TAG = 64
TAG_RULE = f"printable, no commas, at most {MAX_TAG} characters"


def add_parser(sub: Subparsers) -> None:
    s = command(
        sub,
        "points",
        "list recovery points, oldest first",
        [
            "comb -r /backup/repo points",
            "comb -r /backup/repo points --tag nightly --since 2026-11-01 --last 5",
            "comb points -r /backup/repo --source web01 --json",
        ],
        json='print {"points": [...]}, each point with every statistic, its tags and description',
    )
    s.add_argument("--source", help="only this source name")
    s.add_argument(
        "--tag",
        action="append",
        default=[],
        metavar="TAG",
        help="only points with this tag (repeatable: points with every tag given)",
    )
    s.add_argument("--since", metavar="DATE", help="only points from this date/time on (ISO, UTC)")
    s.add_argument("--last", type=int, metavar="N", help="only the N newest of those points")
    s.set_defaults(run=cmd_points)


def check_tag(tag: str) -> str:
    """A tag as given to ``--tag`` (``backup``, ``points``), or a one-line usage error."""
    if not tag or not tag.isprintable() or "," in tag or len(tag) > MAX_TAG or tag != tag.strip():
        raise UsageError(f"bad tag {tag!r}: a tag is {TAG_RULE}, not empty or padded")
    return tag


def point_summary(p: RecoveryPoint) -> dict[str, Any]:
    """A recovery point as ``points --json`` and ``backup --json`` print it."""
    return {
        "id": p.id,
        "source": p.source,
        "source_path": p.source_path,
        "time": p.time,
        "size": p.size,
        "mode": p.mode,
        "parent": p.parent,
        "engine": p.engine,
        "tags": list(p.tags),
        "description": p.description,
        "read_on": list(p.read_on),
        **asdict(p.stats),
    }


def select(points: list[RecoveryPoint], args: argparse.Namespace) -> list[RecoveryPoint]:
    """The points ``--source``, ``--tag``, ``--since`` and ``--last`` leave (oldest first)."""
    tags = {check_tag(t) for t in args.tag}
    if args.last is not None and args.last < 1:
        raise UsageError("--last must be at least 1")
    since = parse_since(args.since) if args.since else None
    out = [
        p
        for p in points
        if (args.source is None or p.source == args.source)
        and tags <= set(p.tags)
        and (since is None or datetime.fromisoformat(p.time) >= since)
    ]
    return out[-args.last :] if args.last is not None else out


def cmd_points(repo: str, args: argparse.Namespace) -> int:
    r = Repository.open(repo, password=args.password)
    points = select(r.points(), args)
    warn_damaged(r)
    if args.json:
        print_json({"points": [point_summary(p) for p in points]})
        return 0
    if not points:
        print("no recovery points")
        return 0
    head = ["ID", "TIME (UTC)", "MODE", "SIZE", "READ", "NEW", "STORED", "SOURCE", "FROM"]
    rows = [
        [
            p.id,
            p.time[:19].replace("T", " "),
            p.mode,
            human_bytes(p.size),
            human_bytes(p.stats.bytes_read),
            human_bytes(p.stats.bytes_new),
            human_bytes(p.stats.bytes_stored),
            p.source,
            p.source_path,
        ]
        for p in points
    ]
    # Tags and descriptions only when some point has them.
    if any(p.tags for p in points):
        head.append("TAGS")
        for row, p in zip(rows, points, strict=True):
            row.append(",".join(p.tags) or "-")
    if any(p.description for p in points):
        head.append("DESCRIPTION")
        for row, p in zip(rows, points, strict=True):
            text = p.description or "-"
            row.append(text.replace("\n", "\\n").replace("\r", "\\r"))
    print_table(head, rows)
    return 0
