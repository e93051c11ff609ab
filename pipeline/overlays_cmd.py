"""``comb overlays``: list, create and remove writable overlays (``drive.overlays.overlay``).

Owns the command's side only: resolving the base point, the table, the JSON. Never opens an
overlay for writing (``serve`` does).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

import drive.overlays.overlay as overlay
from catalog.errors import PointNotFound, UsageError
from catalog.repo import Repository
from catalog.store.points import RecoveryPoint
from drive.nbd.exports import find_point

from .output import human_bytes


def resolve_base(r: Repository, spec: str) -> RecoveryPoint:
    """A point id, unique prefix, ``SOURCE@latest`` or ``SOURCE@ID``/``SOURCE@PREFIX``."""
    try:
        return r.resolve(spec)
    except PointNotFound:
        if "@" not in spec:
            raise
        return find_point(r.points(), spec)


def cmd_overlays(repo: str, args: argparse.Namespace) -> int:
    r = Repository.open(repo)
    action = getattr(args, "action", None) or "list"
    if action == "create":
        overlay.check_name(args.name)
        point = resolve_base(r, args.point)
        overlay.create(r, args.name, point)
        print(f"created overlay {args.name} over recovery point {point.id} of {point.source}")
        return 0
    if action == "rm":
        overlay.remove(r, args.name)
        print(f"removed overlay {args.name}")
        return 0
    infos = [overlay.info(r, name) for name in overlay.names(r)]
    if getattr(args, "json", False):
        print(json.dumps({"overlays": [asdict(i) for i in infos]}, indent=2, sort_keys=True))
        return 0
    if not infos:
        print("no overlays")
        return 0
    head = ["NAME", "BASE", "SOURCE", "SIZE", "WRITTEN", "LOG", "LAST WRITE (UTC)"]
    rows = [
        [
            i.name,
            i.base,
            i.source,
            human_bytes(i.size),
            human_bytes(i.written_bytes),
            human_bytes(i.log_bytes),
            (i.last_write or "-").replace("T", " ").rstrip("Z"),
        ]
        for i in infos
    ]
    widths = [max([len(h), *(len(row[k]) for row in rows)]) for k, h in enumerate(head)]
    for row in (head, *rows):
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
    return 0


def parse_overlay_specs(specs: list[str]) -> dict[str, str]:
    """``--overlay NAME=POINT`` options: name -> point spec (a name given twice is an error)."""
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, point = spec.partition("=")
        if not sep or not point:
            raise UsageError(f"--overlay {spec[:80]!r} is not NAME=POINT")
        overlay.check_name(name)
        if name in out:
            raise UsageError(f"--overlay {name!r} is given twice")
        out[name] = point
    return out


def warn(msg: str) -> None:
    print(f"comb: warning: {msg}", file=sys.stderr)
