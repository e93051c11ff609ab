"""``comb restore POINT OUTPUT``: a recovery point to a file or block device
(``pipeline.jobs.restore``)."""

from __future__ import annotations

import argparse
import time

from catalog.repo import Repository

from ..console import human_bytes, print_json, warn_damaged
from ..jobs.restore import restore_point
from ..locking import reader_lock
from . import POINT_HELP, Subparsers
from .progress import progress_bar


def add_parser(sub: Subparsers) -> None:
    s = sub.add_parser("restore", help="restore a recovery point to a file or block device")
    s.add_argument("point", help=POINT_HELP)
    s.add_argument("output")
    s.add_argument("--force", action="store_true", help="overwrite an existing output")
    s.add_argument("--json", action="store_true")
    s.set_defaults(run=cmd_restore)


def cmd_restore(repo: str, args: argparse.Namespace) -> int:
    r = Repository.open(repo, password=args.password)
    t0 = time.perf_counter()
    with reader_lock(r, "restore"):  # before resolving: a forget and prune cannot slip between
        try:
            point = r.resolve(args.point)
        finally:
            warn_damaged(r)
        with progress_bar(f"restore {point.id[:8]}", not args.json) as bar:
            written = restore_point(r, point, args.output, force=args.force, progress=bar)
    seconds = time.perf_counter() - t0
    if args.json:
        print_json(
            {
                "id": point.id,
                "output": args.output,
                "size": point.size,
                "bytes_written": written,
                "seconds": round(seconds, 3),
            },
            pretty=True,
        )
    else:
        rate = point.size / seconds / 1e6 if seconds else 0.0
        print(
            f"restored {point.id} ({human_bytes(point.size)}, {human_bytes(written)} of data) "
            f"to {args.output} in {seconds:.1f} s ({rate:.0f} MB/s)"
        )
    return 0
