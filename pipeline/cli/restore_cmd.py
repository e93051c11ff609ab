"""``comb restore POINT OUTPUT``: a recovery point to a file or block device
(``pipeline.jobs.restore``)."""

from __future__ import annotations

import argparse
import time

from catalog.repo import Repository

from ..console import human_bytes, human_rate, print_json, warn_damaged
from ..jobs.restore import restore_point
from ..locking import reader_lock
from . import POINT_HELP, Subparsers, command
from .progress import progress_bar


def add_parser(sub: Subparsers) -> None:
    s = command(
        sub,
        "restore",
        "restore a recovery point to a file or block device",
        [
            "comb -r /backup/repo restore web01@latest /tmp/web01.img",
            "comb -r /backup/repo restore 3f2a91 /dev/vg0/restore --force",
        ],
        json="print the result as one JSON object; status lines on stderr",
    )
    s.add_argument("point", help=POINT_HELP)
    s.add_argument("output", help="file (written sparse) or block device to write")
    s.add_argument("--force", action="store_true", help="overwrite an existing output")
    s.set_defaults(run=cmd_restore)


def cmd_restore(repo: str, args: argparse.Namespace) -> int:
    r = Repository.open(repo, password=args.password)
    t0 = time.perf_counter()
    with reader_lock(r, "restore"):  # before resolving: a forget and prune cannot slip between
        try:
            point = r.resolve(args.point)
        finally:
            warn_damaged(r)
        with progress_bar(f"restore {point.id[:8]}", args.json) as bar:
            written = restore_point(r, point, args.output, force=args.force, progress=bar)
    seconds = time.perf_counter() - t0
    if args.json:
        print_json(
            {
                "point": point.id,
                "source": point.source,
                "output": args.output,
                "size": point.size,
                "bytes_written": written,
                "seconds": round(seconds, 3),
            }
        )
    else:
        print(
            f"restored {point.id} ({human_bytes(point.size)}, {human_bytes(written)} of data) "
            f"to {args.output} in {seconds:.1f} s ({human_rate(point.size, seconds)})"
        )
    return 0
