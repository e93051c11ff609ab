"""``comb repair index``: rebuild the chunk index from the packs (``catalog.maint.repair``);
``comb repair undelete --since TIME``: bring back the objects of an S3 repository deleted or
replaced since then (``catalog.store.s3_versions``)."""

from __future__ import annotations

import argparse
from dataclasses import asdict

from catalog.errors import CorruptionError, UsageError
from catalog.maint.repair import repair_index
from catalog.repo import Repository
from catalog.store.s3 import S3Storage, is_s3
from catalog.store.s3_versions import undo_since

from ..console import print_json, waiting, warn
from ..locking import ensure_locking
from . import Subparsers, command
from .analytics_cmd import parse_since


def add_parser(sub: Subparsers) -> None:
    s = command(
        sub,
        "repair",
        "rebuild derived data: `repair index` rebuilds the chunk index from the packs; "
        "`repair undelete` brings back what was deleted or replaced since a time (S3)",
        [
            "comb -r /backup/repo repair index",
            "comb -r s3://bucket/repo repair undelete --since 2026-12-01T08:00Z --dry-run",
        ],
        json="print what was rebuilt or brought back as one JSON object",
    )
    s.add_argument("what", choices=["index", "undelete"], help="what to repair")
    s.add_argument(
        "--since", metavar="TIME", help="undelete: what was deleted or replaced from TIME on (ISO)"
    )
    s.add_argument("--dry-run", action="store_true", help="undelete: say what, change nothing")
    s.set_defaults(run=cmd_repair)


def cmd_undelete(repo: str, args: argparse.Namespace) -> int:
    if not is_s3(repo):
        raise UsageError("repair undelete needs an s3:// repository (a bucket keeping versions)")
    if not args.since:
        raise UsageError("repair undelete needs --since TIME: when the deletions began")
    done = undo_since(S3Storage.existing(repo), parse_since(args.since), args.dry_run)
    if args.json:
        print_json({**asdict(done), "dry_run": args.dry_run})
        return 0
    verb = "would bring" if args.dry_run else "brought"
    print(
        f"{verb} back {len(done.undeleted)} deleted and {len(done.reverted)} replaced "
        f"object(s); {len(done.left)} changed since but new then or deleted before, left as is"
    )
    if (done.undeleted or done.reverted) and not args.dry_run:
        print(f"next: comb -r {repo} verify")
    return 0


def cmd_repair(repo: str, args: argparse.Namespace) -> int:
    if args.what == "undelete":
        return cmd_undelete(repo, args)
    if args.since or args.dry_run:
        raise UsageError("--since and --dry-run are options of `repair undelete`")
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
