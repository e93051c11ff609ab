"""``comb repair index``: rebuild the chunk index from the packs (``catalog.maint.repair``)."""

from __future__ import annotations

import argparse

from catalog.errors import CorruptionError
from catalog.maint.repair import repair_index
from catalog.repo import Repository

from ..console import print_json, waiting, warn
from ..locking import ensure_locking
from . import Subparsers, command


def add_parser(sub: Subparsers) -> None:
    s = command(
        sub,
        "repair",
        "rebuild derived data: `repair index` rebuilds the chunk index from the packs",
        ["comb -r /backup/repo repair index"],
        json="print what was rebuilt as one JSON object",
    )
    s.add_argument("what", choices=["index"], help="what to rebuild: index")
    s.set_defaults(run=cmd_repair)


def cmd_repair(repo: str, args: argparse.Namespace) -> int:
    r = Repository.open(repo, password=args.password)
    ensure_locking(r)
    res = repair_index(r, on_wait=waiting)
    if args.json:
        print_json(
            {
                "packs_indexed": res.packs,
                "chunks_indexed": res.chunks,
                "segments_replaced": res.old_segments,
                "unreadable": res.unreadable,
            }
        )
    else:
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
