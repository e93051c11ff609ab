"""``comb index``, ``comb find`` and ``comb diff``: the file catalogs of recovery points
(``catalog.store.filecat``, built by ``pipeline.jobs.index``) and what they answer.

Owns the three commands' parsers and output. Must not: walk a filesystem or read a catalog's
files itself.
"""

from __future__ import annotations

import argparse
import sys
import time

import pyarrow as pa
import pyarrow.compute as pc

from catalog.analytics import file_history
from catalog.analytics.file_versions import versions
from catalog.errors import CombError, UsageError
from catalog.read.compare import changed_runs
from catalog.repo import Repository
from catalog.store import filecat
from catalog.store.points import RecoveryPoint
from drive.files.view import READABLE

from ..console import human_bytes, print_json, print_table, warn, warn_damaged
from ..jobs.index import Indexed, index_point
from ..locking import reader_lock, writer_lock
from . import POINT_HELP, Subparsers, command
from .analytics_cmd import parse_since


def add_parser(sub: Subparsers) -> None:
    s = command(
        sub,
        "index",
        "build the file catalog of recovery points (backups do it for new points)",
        ["comb -r /backup/repo index web01@latest", "comb -r /backup/repo index --all"],
        json="print one JSON object per point",
    )
    s.add_argument("point", nargs="?", help=POINT_HELP)
    s.add_argument("--all", action="store_true", help="every point that has no catalog yet")
    s.set_defaults(run=cmd_index)
    f = command(
        sub,
        "find",
        "find files by name in every point's catalog: each version, where it was first seen",
        [
            "comb -r /backup/repo find nginx.conf",
            "comb -r /backup/repo find '*.docx' --source fileserver --since 2026-11-01",
            "comb -r /backup/repo find '/part1/etc/*' --json",
        ],
        json='print {"versions": [...]}',
    )
    f.add_argument(
        "pattern",
        help="a glob on the file name (*, ?, [...]); with a / in it, on the whole path "
        "(/VOLUME/...)",
    )
    f.add_argument("--source", help="only this source's points")
    f.add_argument("--since", help="only versions seen at or after this date (YYYY-MM-DD)")
    f.add_argument("-i", "--ignore-case", action="store_true", help="match case-insensitively")
    f.set_defaults(run=cmd_find)
    d = command(
        sub,
        "diff",
        "what differs between two recovery points: changed extents, or files (--files)",
        [
            "comb -r /backup/repo diff web01@3f2a web01@latest",
            "comb -r /backup/repo diff web01@3f2a web01@latest --files /part1/etc",
        ],
        json="print one JSON object",
    )
    d.add_argument("point_a", help=POINT_HELP)
    d.add_argument("point_b", help=POINT_HELP)
    d.add_argument("path", nargs="?", help="with --files: only below this path (/VOLUME/...)")
    d.add_argument(
        "--files",
        nargs="?",
        const="",
        metavar="PATH",
        help="files added, removed and modified (below PATH, if given)",
    )
    d.set_defaults(run=cmd_diff)


def _figures(got: Indexed) -> dict[str, object]:
    """What a catalog's building did, as the JSON outputs say it."""
    doc = got.doc
    return {
        "entries": doc.entries,
        "added": doc.added,
        "modified": doc.modified,
        "removed": doc.removed,
        "walked": got.walked,
        "folders_relisted": got.relisted,
        "skipped": doc.skipped,
        "seconds": round(got.seconds, 3),
    }


def _said(got: Indexed, point: RecoveryPoint, as_json: bool) -> None:
    doc = got.doc
    if as_json:
        print_json({"point": point.id, **_figures(got), "existed": got.existed})
        return
    if got.existed:
        print(f"{point.id}: file catalog already there ({doc.entries} entries)")
        return
    if not any(v.get("fstype") in READABLE for v in doc.volumes):
        found = ", ".join(str(v.get("fstype") or v.get("note") or "unknown") for v in doc.volumes)
        print(f"{point.id}: no filesystem comb reads on this disk ({found or 'no volume'})")
        return
    if not got.walked:
        how = "no folder changed: the parent's listing kept"
    elif doc.base is not None and got.relisted:
        how = f"{got.relisted} changed folders listed again"
    else:
        how = "walked"
    print(
        f"{point.id}: file catalog of {doc.entries} entries (+{doc.added} ~{doc.modified} "
        f"-{doc.removed}; {how}) in {got.seconds:.1f} s"
    )


def cmd_index(repo: str, args: argparse.Namespace) -> int:
    if (args.point is None) == (not args.all):
        raise UsageError("index needs a POINT or --all (not both)")
    r = Repository.open(repo, password=args.password)
    with writer_lock(r, "index"):
        try:
            points = [r.resolve(args.point)] if args.point else r.points()
        finally:
            warn_damaged(r)
        done = filecat.cataloged(r.storage)
        # Oldest first: each point's catalog can then be stored as a change to its parent's.
        for point in sorted(points, key=lambda p: (p.time, p.id)):
            if args.all and point.id in done:
                continue
            got = index_point(r, point)
            for line in got.doc.skipped:
                warn(line)
            _said(got, point, args.json)
    return 0


def index_after_backup(
    r: Repository, points: list[RecoveryPoint], as_json: bool
) -> dict[str, dict[str, object]]:
    """The catalogs of points a backup just committed, summed up per point; a failure or an
    interruption is a warning (the points are committed and good; `comb index` builds the
    catalog later)."""
    out: dict[str, dict[str, object]] = {}
    for point in points:
        try:
            with writer_lock(r, "index"):
                got = index_point(r, point)
        except CombError as err:
            warn(f"no file catalog for {point.id}: {err} (`comb index {point.id}` retries)")
            continue
        except (OSError, ValueError, ArithmeticError, pa.ArrowException) as err:
            # A bug or an unforeseen guest filesystem must not turn a committed backup into a
            # failure: said loudly, with what it was (`comb --debug index` shows the traceback).
            what = f"{type(err).__name__}: {err}".splitlines()[0]
            warn(f"no file catalog for {point.id}: {what} (please report it)", loud=True)
            continue
        except KeyboardInterrupt:
            warn(f"file catalog of {point.id} interrupted (`comb index {point.id}` builds it)")
            break
        for line in got.doc.skipped:
            warn(f"file catalog of {point.id[:8]}: {line}")
        out[point.id] = _figures(got)
        if not as_json:
            _said(got, point, False)
    return out


def cmd_find(repo: str, args: argparse.Namespace) -> int:
    r = Repository.open(repo, password=args.password)
    history = file_history.load(r.storage)
    for msg in history.point_problems:
        warn(f"skipping {msg}")
    for msg in history.problems:
        warn(f"left out: {msg}")
    since = parse_since(args.since) if args.since else None
    rows = versions(history, args.pattern, args.ignore_case, args.source, since)
    if args.json:
        print_json({"pattern": args.pattern, "versions": rows})
        return 0
    if not rows:
        print(f"no file matches {args.pattern!r} in any kept point's catalog")
        return 0
    print_table(
        ["source", "path", "size", "modified", "first seen", "point", "in points"],
        [
            [
                row["source"],
                row["path"],
                str(row["size"]),
                str(row["mtime"])[:19],
                str(row["first_seen"])[:19],
                row["first_point"][:8],
                str(row["points"]),
            ]
            for row in rows
        ],
    )
    return 0


def _listing(r: Repository, point: RecoveryPoint) -> pa.Table:
    listing = filecat.read_listing(r.storage, point.id)
    if listing is None:
        raise UsageError(f"point {point.id} has no file catalog: run `comb index {point.id}`")
    return listing


_MARK = {"added": "+", "removed": "-", "modified": "M"}


def _file_diff(r: Repository, a: RecoveryPoint, b: RecoveryPoint, args: argparse.Namespace) -> int:
    changes = filecat.diff(_listing(r, a), _listing(r, b))
    changes = changes.filter(pc.not_equal(changes.column("change"), filecat.LOCATED))
    volume = changes.column("volume")
    full = pc.binary_join_element_wise(
        pa.scalar(b"/"), volume.cast(pa.binary()), changes.column("path"), pa.scalar(b"")
    )
    shown = pc.binary_join_element_wise(volume, changes.column("path_text"), "")
    changes = changes.append_column("_full", full).append_column("_shown", shown)
    if args.path:
        prefix = b"/" + args.path.strip("/").encode("utf-8", "surrogateescape")
        keep = pc.or_(
            pc.equal(full, prefix),
            pc.equal(pc.binary_slice(full, 0, len(prefix) + 1), prefix + b"/"),
        )
        changes = changes.filter(keep)
    rows = changes.select(["_shown", "change", "kind", "size", "mtime_ns"]).to_pylist()
    if args.json:
        print_json(
            {
                "point_a": a.id,
                "point_b": b.id,
                "path": args.path,
                "changes": [
                    {
                        "path": "/" + x["_shown"],
                        "change": x["change"],
                        "kind": x["kind"],
                        "size": x["size"],
                        "mtime_ns": x["mtime_ns"],
                    }
                    for x in rows
                ],
            }
        )
        return 0
    for x in rows:
        print(f"{_MARK[x['change']]} /{x['_shown']}")
    counts = {k: sum(1 for x in rows if x["change"] == k) for k in _MARK}
    print(
        f"{counts['added']} added, {counts['removed']} removed, {counts['modified']} modified "
        f"from {a.id[:8]} to {b.id[:8]}",
        file=sys.stderr,
    )
    return 0


def cmd_diff(repo: str, args: argparse.Namespace) -> int:
    if args.files and args.path:
        raise UsageError("give the PATH once (after --files, or as the last argument)")
    if args.files:
        args.path, args.files = args.files, ""
    if args.path and args.files is None:
        raise UsageError("a PATH needs --files (the block comparison covers the whole disk)")
    r = Repository.open(repo, password=args.password)
    with reader_lock(r, "diff"):
        try:
            a, b = r.resolve(args.point_a), r.resolve(args.point_b)
        finally:
            warn_damaged(r)
        if args.files is not None:
            return _file_diff(r, a, b, args)
        t0 = time.perf_counter()
        runs = changed_runs(a, r.manifest(a), b, r.manifest(b))
        seconds = time.perf_counter() - t0
    changed = sum(n for _, n in runs)
    if args.json:
        print_json(
            {
                "point_a": a.id,
                "point_b": b.id,
                "size_a": a.size,
                "size_b": b.size,
                "changed_bytes": changed,
                "extents": [[o, n] for o, n in runs],
                "seconds": round(seconds, 3),
            }
        )
        return 0
    for offset, length in runs:
        print(f"{offset:>16}  {length:>14}  ({human_bytes(length)})")
    print(
        f"{len(runs)} changed extents, {human_bytes(changed)} of {human_bytes(max(a.size, b.size))}"
        f" from {a.id[:8]} to {b.id[:8]}",
        file=sys.stderr,
    )
    return 0
