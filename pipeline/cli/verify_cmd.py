"""``comb verify``: check the repository's structure, and with ``--read-data`` every chunk
(``catalog.maint.check``), and every overlay (``drive.overlays.overlay``)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict

import drive.overlays.overlay as overlay
from catalog.errors import CorruptionError
from catalog.maint.check import check_repository, summary
from catalog.repo import Repository

from ..console import print_json
from ..locking import reader_lock
from . import Subparsers, command
from .progress import PACKS, progress_bar

# The report's counts, printed as `<things>_checked` (README.md, "JSON output").
COUNTS = ("points", "packs", "chunks")


def add_parser(sub: Subparsers) -> None:
    s = command(
        sub,
        "verify",
        "check the repository's points, manifests, index and overlays",
        ["comb -r /backup/repo verify", "comb -r /backup/repo verify --read-data --json"],
        json="print the findings as one JSON object; status lines on stderr",
    )
    s.add_argument(
        "--read-data",
        action="store_true",
        help="also read every pack and re-hash every chunk",
    )
    s.set_defaults(run=cmd_verify)


def cmd_verify(repo: str, args: argparse.Namespace) -> int:
    r = Repository.open(repo, password=args.password)
    with reader_lock(r, "verify"), progress_bar("verify", args.json, PACKS) as bar:
        report = check_repository(r.storage, read_data=args.read_data, progress=bar)
        ids = {p.id for p in r.points()}
        for name in overlay.names(r):
            errors, warnings = overlay.check(r, name, ids)
            report.errors += errors
            report.warnings += warnings
    if args.json:
        counted = {f"{k}_checked" if k in COUNTS else k: v for k, v in asdict(report).items()}
        print_json({"ok": report.ok, "read_data": args.read_data, **counted})
    else:
        for w in report.warnings:
            print(f"warning: {w}", file=sys.stderr)
        for e in report.errors:
            print(f"error: {e}", file=sys.stderr)
        print(summary(report))
    if not report.ok:
        raise CorruptionError(
            f"verify found {len(report.errors)} error(s); first: {report.errors[0]}"
        )
    return 0
