"""``comb restore POINT OUTPUT``: a recovery point to a file or block device, or with ``-`` to
standard output (``pipeline.jobs.restore``)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from catalog.errors import OutputError, UsageError
from catalog.repo import Repository
from catalog.store.points import RecoveryPoint
from drive.files.extract import OVERWRITE

from ..console import human_bytes, human_rate, json_value, print_json, warn_damaged
from ..jobs.restore import Progress, restore_point, restore_to_stream
from ..jobs.restore_delta import DeltaResult, delta_restore
from ..locking import reader_lock
from . import POINT_HELP, Subparsers, command
from .files_cmd import restore_files
from .progress import progress_bar

STDOUT = "-"


def add_parser(sub: Subparsers) -> None:
    s = command(
        sub,
        "restore",
        "restore a recovery point to a file, block device or standard output",
        [
            "comb -r /backup/repo restore web01@latest /tmp/web01.img",
            "comb -r /backup/repo restore 3f2a91 /dev/vg0/restore --force",
            "comb -r /backup/repo restore web01@latest - | ssh host 'dd of=/dev/vdb bs=4M'",
            "comb -r /backup/repo restore web01@latest /tmp/web01.img --delta",
            "comb -r /backup/repo restore web01@latest --path /part1/srv --target /tmp/r --xattrs",
        ],
        json="print the result as one JSON object (on stderr with -); status lines on stderr",
    )
    s.add_argument("point", help=POINT_HELP)
    s.add_argument(
        "output",
        nargs="?",
        help="file (written sparse) or block device to write; - for standard output (the raw "
        "image, zero regions as zeros; not a terminal)",
    )
    s.add_argument("--force", action="store_true", help="overwrite an existing output")
    s.add_argument(
        "--delta",
        action="store_true",
        help="rewrite in place only the chunks of an existing output that differ from the point "
        "(compared by chunk id; implies overwriting; an interrupted run leaves a mix: rerun it)",
    )
    files = s.add_argument_group("files and folders (instead of the whole disk)")
    files.add_argument(
        "--path",
        help="a file or folder inside the point (/part1/home/ann; `comb ls POINT` shows them), "
        "restored as TARGET/<its name>",
    )
    files.add_argument("--target", help="the folder to restore --path into (made if missing)")
    files.add_argument(
        "--overwrite",
        choices=OVERWRITE,
        default="never",
        help="an existing file in the target: keep it (never, the default), replace it when "
        "the point's copy is newer (if-newer), or replace it (always)",
    )
    files.add_argument(
        "--special",
        action="store_true",
        help="also restore FIFOs, and as root character and block devices (left out by "
        "default; sockets never)",
    )
    files.add_argument(
        "--xattrs",
        action="store_true",
        help="also restore extended attributes and POSIX ACLs (ext2/3/4 and XFS; trusted.* and "
        "security.* only as root; NTFS security descriptors and EAs are not restored)",
    )
    s.set_defaults(run=cmd_restore)


def _to_stdout(r: Repository, point: RecoveryPoint, bar: Progress | None) -> int:
    """The image to standard output; a reader that stops early is an error (what it got is
    not the whole image), not the silent end that a closed pipe is for other commands."""
    try:
        return restore_to_stream(r, point, sys.stdout.buffer, progress=bar)
    except BrokenPipeError:
        # What is still buffered goes nowhere, so the exit does not fail on it again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        raise OutputError("standard output was closed before the whole image was written") from None


def _check_delta(args: argparse.Namespace) -> None:
    if args.output == STDOUT:
        raise UsageError("--delta needs an existing file or block device, not standard output (-)")
    if not os.path.exists(args.output):
        raise UsageError(f"--delta needs an existing output: {args.output} does not exist")


def _print_delta(
    args: argparse.Namespace, point: RecoveryPoint, got: DeltaResult, s: float
) -> None:
    if args.json:
        print_json(
            {
                "point": point.id,
                "source": point.source,
                "output": args.output,
                "size": point.size,
                "delta": True,
                "bytes_checked": got.bytes_checked,
                "bytes_written": got.bytes_written,
                "chunks_rewritten": got.chunks_rewritten,
                "seconds": round(s, 3),
            }
        )
        return
    print(
        f"restored {point.id} to {args.output} in place: compared "
        f"{human_bytes(got.bytes_checked)}, rewrote {got.chunks_rewritten} chunk(s) "
        f"({human_bytes(got.bytes_written)}) in {s:.1f} s "
        f"({human_rate(got.bytes_checked, s)})"
    )


def cmd_restore(repo: str, args: argparse.Namespace) -> int:
    if args.path is not None or args.target is not None:
        return restore_files(repo, args)
    if args.output is None:
        raise UsageError("restore needs an OUTPUT (or --path and --target for files)")
    if args.xattrs:
        raise UsageError("--xattrs restores the attributes of files: give --path and --target")
    to_stdout = args.output == STDOUT
    if args.delta:
        _check_delta(args)
    if to_stdout and args.force:
        raise UsageError("--force does not apply to standard output (-)")
    if to_stdout and sys.stdout.isatty():
        raise UsageError(
            "standard output is a terminal: redirect it (`> FILE`, `| ...`) or give a file"
        )
    r = Repository.open(repo, password=args.password)
    t0 = time.perf_counter()
    with reader_lock(r, "restore"):  # before resolving: a forget and prune cannot slip between
        try:
            point = r.resolve(args.point)
        finally:
            warn_damaged(r)
        with progress_bar(f"restore {point.id[:8]}", args.json) as bar:
            if args.delta:
                got = delta_restore(r, point, args.output, progress=bar)
            elif to_stdout:
                written = _to_stdout(r, point, bar)
            else:
                written = restore_point(r, point, args.output, force=args.force, progress=bar)
    seconds = time.perf_counter() - t0
    if args.delta:
        _print_delta(args, point, got, seconds)
        return 0
    if args.json:
        doc = {
            "point": point.id,
            "source": point.source,
            "output": args.output,
            "size": point.size,
            "bytes_written": written,
            "seconds": round(seconds, 3),
        }
        if to_stdout:  # standard output holds the image
            print(json.dumps(doc, sort_keys=True, default=json_value), file=sys.stderr)
        else:
            print_json(doc)
    else:
        print(
            f"restored {point.id} ({human_bytes(point.size)}, {human_bytes(written)} of data) "
            f"to {'standard output' if to_stdout else args.output} in {seconds:.1f} s "
            f"({human_rate(point.size, seconds)})",
            file=sys.stderr if to_stdout else sys.stdout,
        )
    return 0
