"""``comb copy``: recovery points of the repository (``-r`` or ``--from``) into another one
(``--to``), sending only what that one lacks (the job is ``pipeline.jobs.copy``)."""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

from catalog.errors import UsageError
from catalog.repo import Repository
from catalog.store.locations import canonical
from catalog.store.points import RecoveryPoint

from ..console import human_bytes, print_json
from ..engines import Engine
from ..jobs.copy import copy_points
from . import Subparsers, command
from .backup_cmd import add_engine_options, engine_for, say_engine
from .passwords import other_password_source
from .progress import progress_bar

TO_PASSWORD_ENV = "COMB_TO_PASSWORD"
TO_PASSWORD_FILE_ENV = "COMB_TO_PASSWORD_FILE"


def add_parser(sub: Subparsers) -> None:
    s = command(
        sub,
        "copy",
        "copy recovery points into another repository (local or S3), sending only what it lacks",
        [
            "comb copy --from /backup/repo --to s3://bucket/offsite",
            "comb -r /backup/repo copy --to s3://bucket/offsite --source web01",
            "comb -r s3://bucket/offsite copy web01@latest --to /restore/repo --json",
        ],
        json="print what was copied and skipped as one JSON object",
    )
    s.add_argument("points", nargs="*", metavar="POINT", help="points to copy (default: all)")
    s.add_argument("--from", dest="from_repo", metavar="REPO", help="the repository to copy from")
    s.add_argument("--to", dest="to_repo", metavar="REPO", required=True, help="copy into REPO")
    s.add_argument("--source", metavar="S", help="only the points of source S")
    s.add_argument(
        "--to-password-file",
        metavar="FILE",
        help=f"the target's password (else {TO_PASSWORD_FILE_ENV}, {TO_PASSWORD_ENV}, or the "
        "source's password)",
    )
    add_engine_options(s)
    s.set_defaults(run=cmd_copy, needs_repo=False)


def cmd_copy(repo: str, args: argparse.Namespace) -> int:
    location = args.from_repo or args.repo or os.environ.get("COMB_REPO")
    if not location:
        raise UsageError("copy needs the repository to copy from (--from REPO or -r REPO)")
    if args.from_repo and args.repo and args.from_repo != args.repo:
        raise UsageError("give the repository to copy from once (--from or -r)")
    if canonical(args.to_repo) == canonical(location):
        raise UsageError("--to names the repository copied from")
    src = Repository.open(location, password=args.password)
    to_password = other_password_source(
        args.to_password_file, TO_PASSWORD_ENV, TO_PASSWORD_FILE_ENV, args.password
    )
    dst = Repository.open(args.to_repo, password=to_password)
    if dst.config.id == src.config.id:
        raise UsageError(f"{args.to_repo} is the repository copied from")
    points = [src.resolve(spec) for spec in args.points] if args.points else src.points()
    if args.source is not None:
        points = [p for p in points if p.source == args.source]
        if not points:
            raise UsageError(f"no recovery point of source {args.source!r} to copy")
    unused, used = [engine_for(args)], []  # (the options checked before anything is read)

    def engine() -> Engine:  # a new one per point: an engine runs once
        used.append(unused.pop() if unused else engine_for(args))
        return used[-1]

    t0 = time.perf_counter()
    done: list[tuple[RecoveryPoint, RecoveryPoint | None]] = []
    with progress_bar("copy", args.json, starting="preparing ...") as bar:
        for original, copy in copy_points(src, dst, points, engine, bar, args.batch_mib << 20):
            done.append((original, copy))
            if not args.json:
                _say(original, copy)
    if used:
        say_engine(used[-1])
    if args.json:
        print_json(_doc(done, time.perf_counter() - t0))
    return 0


def _say(original: RecoveryPoint, copy: RecoveryPoint | None) -> None:
    if copy is None:
        print(f"{original.id} of {original.source}: copied already")
        return
    st = copy.stats
    print(
        f"{original.id} of {original.source} copied as {copy.id} ({copy.mode}): read "
        f"{human_bytes(st.bytes_read)}, new {human_bytes(st.bytes_new)}, stored "
        f"{human_bytes(st.bytes_stored)}"
    )


def _doc(done: list[tuple[RecoveryPoint, RecoveryPoint | None]], seconds: float) -> dict[str, Any]:
    copied = [
        {
            "point": o.id,
            "source": o.source,
            "copy": c.id,
            "mode": c.mode,
            "bytes_read": c.stats.bytes_read,
            "bytes_new": c.stats.bytes_new,
            "bytes_stored": c.stats.bytes_stored,
        }
        for o, c in done
        if c is not None
    ]
    skipped = [o.id for o, c in done if c is None]
    return {"copied": copied, "skipped": skipped, "seconds": round(seconds, 3)}
