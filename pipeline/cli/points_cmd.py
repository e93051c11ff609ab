"""``comb points``: list the recovery points (a table, or JSON)."""

from __future__ import annotations

import argparse
from dataclasses import asdict
from typing import Any

from catalog.repo import Repository
from catalog.store.points import RecoveryPoint

from ..console import human_bytes, print_json, print_table, warn_damaged
from . import Subparsers, command


def add_parser(sub: Subparsers) -> None:
    s = command(
        sub,
        "points",
        "list recovery points, oldest first",
        ["comb -r /backup/repo points", "comb points -r /backup/repo --source web01 --json"],
        json='print {"points": [...]}, each point with every statistic',
    )
    s.add_argument("--source", help="only this source name")
    s.set_defaults(run=cmd_points)


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
        **asdict(p.stats),
    }


def cmd_points(repo: str, args: argparse.Namespace) -> int:
    r = Repository.open(repo, password=args.password)
    points = [p for p in r.points() if args.source is None or p.source == args.source]
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
    print_table(head, rows)
    return 0
