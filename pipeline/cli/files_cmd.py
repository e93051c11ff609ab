"""``comb ls POINT [PATH]`` and ``comb cat POINT PATH``: the files inside a recovery point, read
in user space from the point's blocks (``drive.files``), without mounting anything.

Owns the two commands' parsers, output and the opening of a point's files (``point_files``,
which ``restore --path`` uses too). Must not: parse a filesystem or resolve a path itself.
"""

from __future__ import annotations

import argparse
import stat
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from catalog.errors import PathNotFound, UsageError
from catalog.repo import Repository
from catalog.store.points import RecoveryPoint
from drive.files.entries import display
from drive.files.extract import extract
from drive.files.view import Node, PointFiles

from ..console import human_bytes, print_json, print_table, table_row, warn, warn_damaged
from ..locking import reader_lock
from . import POINT_HELP, Subparsers, command

EXIT_PARTIAL = 15  # restore --path: some entries were skipped (README.md "Exit codes")
PATH_HELP = (
    "a path inside the point: /VOLUME/... (e.g. /part1/etc/fstab); `comb ls POINT` lists the "
    "volumes"
)


def add_parser(sub: Subparsers) -> None:
    s = command(
        sub,
        "ls",
        "list the volumes of a recovery point, or the files of a directory inside it",
        [
            "comb -r /backup/repo ls web01@latest",
            "comb -r /backup/repo ls web01@latest /part1/etc -l",
            "comb -r /backup/repo ls web01@latest /part2/home -R --json",
        ],
        json="print one JSON object with the entries",
    )
    s.add_argument("point", help=POINT_HELP)
    s.add_argument("path", nargs="?", default="/", help=PATH_HELP + " (default /)")
    s.add_argument("-l", "--long", action="store_true", help="mode, owner, size, time")
    s.add_argument("-R", "--recursive", action="store_true", help="everything below PATH")
    s.set_defaults(run=cmd_ls)
    c = command(
        sub,
        "cat",
        "write one file of a recovery point to standard output",
        ["comb -r /backup/repo cat web01@latest /part1/etc/fstab"],
        json=None,
    )
    c.add_argument("point", help=POINT_HELP)
    c.add_argument("path", help=PATH_HELP)
    c.set_defaults(run=cmd_cat)


@contextmanager
def point_files(
    repo: str, args: argparse.Namespace, kind: str
) -> Iterator[tuple[RecoveryPoint, PointFiles]]:
    """The point named by ``args.point``, under a reader lock, and its files."""
    r = Repository.open(repo, password=args.password)
    with reader_lock(r, kind):
        try:
            point = r.resolve(args.point)
        finally:
            warn_damaged(r)
        with PointFiles(r.reader(point)) as files:
            try:
                yield point, files
            finally:
                for line in files.skipped:
                    warn(line)


def _time(ns: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(ns // 1_000_000_000))


def _kind_char(kind: str) -> str:
    return {"dir": "d", "symlink": "l", "fifo": "p", "chardev": "c", "blockdev": "b"}.get(kind, "-")


def _row(node: Node, name: str) -> list[str]:
    e = node.entry
    mode = _kind_char(e.kind) + stat.filemode(e.mode)[1:]
    shown = name + (f" -> {display(e.target)}" if e.target is not None else "")
    return [mode, str(e.nlink), str(e.uid), str(e.gid), str(e.size), _time(e.mtime_ns), shown]


def _json(node: Node) -> dict[str, Any]:
    e = node.entry
    doc: dict[str, Any] = {
        "path": display(node.path),
        "kind": e.kind,
        "size": e.size,
        "mode": e.mode,
        "uid": e.uid,
        "gid": e.gid,
        "mtime_ns": e.mtime_ns,
        "inode": e.inode,
        "nlink": e.nlink,
    }
    try:
        node.path.decode("utf-8")
    except UnicodeDecodeError:
        doc["path_bytes"] = node.path.hex()  # the exact name, where text cannot hold it
    if e.target is not None:
        doc["target"] = display(e.target)
    return doc


def _volumes(point: RecoveryPoint, files: PointFiles, args: argparse.Namespace) -> None:
    vols = files.volumes()
    if args.json:
        print_json({"point": point.id, "path": "/", "volumes": [v.__dict__ for v in vols]})
        return
    rows = [
        [
            "/" + v.name,
            v.fstype or v.note or "unknown",
            human_bytes(v.size),
            v.label or "",
            str(v.offset),
        ]
        for v in vols
    ]
    print_table(["volume", "type", "size", "label", "offset"], rows)


def cmd_ls(repo: str, args: argparse.Namespace) -> int:
    with point_files(repo, args, "ls") as (point, files):
        node = files.lookup(args.path)
        if node.path == b"/" and not args.recursive:
            _volumes(point, files, args)
            return 0
        if args.recursive:
            nodes = list(files.walk(node)) if node.entry.is_dir else [node]
        else:
            nodes = files.listdir(node) if node.entry.is_dir else [node]
        if args.json:
            print_json(
                {
                    "point": point.id,
                    "path": display(node.path),
                    "entries": [_json(n) for n in nodes],
                }
            )
            return 0
        names = [display(n.path) if args.recursive else display(n.entry.name) for n in nodes]
        if args.long:
            rows = [_row(n, name) for n, name in zip(nodes, names, strict=True)]
            widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))] if rows else []
            for r in rows:
                print(table_row(r, widths))
        else:
            for name in names:
                print(name)
    return 0


def cmd_cat(repo: str, args: argparse.Namespace) -> int:
    with point_files(repo, args, "cat") as (_, files):
        node = files.lookup(args.path)
        if node.entry.kind == "symlink":
            raise PathNotFound(
                f"{display(node.path)}: a symbolic link to {display(node.entry.target or b'')}"
            )
        if node.entry.kind != "file":
            raise PathNotFound(f"{display(node.path)}: not a regular file (a {node.entry.kind})")
        out = sys.stdout.buffer
        written = 0
        for offset, data in files.data(node):
            if offset > written:
                _zeros(out, offset - written)
            out.write(data)
            written = offset + len(data)
        if written < node.entry.size:
            _zeros(out, node.entry.size - written)
        out.flush()
    return 0


def _zeros(out: Any, n: int) -> None:
    block = bytes(min(n, 1 << 20))
    while n > 0:
        out.write(block[: min(n, len(block))])
        n -= len(block)


def restore_files(repo: str, args: argparse.Namespace) -> int:
    """``restore POINT --path P --target DIR``: a file or folder of the point into DIR; exit
    code 15 when some entries could not be restored (each named in a warning)."""
    if args.path is None or args.target is None:
        raise UsageError("restoring files needs both --path and --target")
    if args.output is not None or args.delta or args.force:
        raise UsageError("--path restores into --target: give no OUTPUT, --delta or --force")
    t0 = time.perf_counter()
    with point_files(repo, args, "restore") as (point, files):
        node = files.lookup(args.path)
        xattrs = bool(args.xattrs)
        done = extract(files, node, args.target, args.overwrite, args.special, warn, xattrs)
    seconds = time.perf_counter() - t0
    if args.json:
        doc = {
            "point": point.id,
            "path": display(node.path),
            "target": args.target,
            "files": done.files,
            "dirs": done.dirs,
            "hard_links": done.links,
            "bytes_written": done.bytes,
            "existing_kept": done.existing,
            "skipped": done.skipped,
            "seconds": round(seconds, 3),
        }
        print_json({**doc, "xattrs_set": done.xattrs} if xattrs else doc)
    else:
        kept = f", kept {done.existing} existing" if done.existing else ""
        kept += f", {done.xattrs} xattrs set" if xattrs else ""
        skipped = f", skipped {len(done.skipped)}" if done.skipped else ""
        print(
            f"restored {display(node.path)} of {point.id} to {args.target}: {done.files} files, "
            f"{done.dirs} folders, {done.links} hard links, {human_bytes(done.bytes)}"
            f"{kept}{skipped} in {seconds:.1f} s"
        )
    return EXIT_PARTIAL if done.skipped else 0
