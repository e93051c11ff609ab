"""``comb repair index``: rebuild the chunk index from the packs (``catalog.maint.repair``)."""

from __future__ import annotations

import argparse

from catalog.errors import CorruptionError
from catalog.maint.repair import repair_index
from catalog.repo import Repository

from ..console import waiting, warn
from ..locking import ensure_locking
from . import Subparsers


def add_parser(sub: Subparsers) -> None:
    s = sub.add_parser("repair", help="rebuild derived data: `repair index` (from the packs)")
    s.add_argument("what", choices=["index"])
    s.set_defaults(run=cmd_repair)


def cmd_repair(repo: str, args: argparse.Namespace) -> int:
    r = Repository.open(repo, password=args.password)
    ensure_locking(r)
    res = repair_index(r, on_wait=waiting)
    for msg in res.unreadable:
        warn(f"left out: {msg}")
    print(
        f"rebuilt the index from {res.packs} pack(s) ({res.chunks} chunk(s)); "
        f"replaced {res.old_segments} segment(s)"
    )
    if res.unreadable:
        raise CorruptionError(
            f"{len(res.unreadable)} pack(s) unreadable and left out of the index; points that "
            "need their chunks cannot be restored until a backup stores the data again"
        )
    return 0
