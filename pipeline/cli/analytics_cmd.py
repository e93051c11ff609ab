"""The analytics commands, DuckDB over the history (``catalog.analytics``): ``query``,
``report``, ``dashboard`` and ``catalog-schema``."""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa

from catalog.analytics.catalog import Catalog
from catalog.analytics.reports import REPORTS, ReportOptions, run_report
from catalog.analytics.schema_doc import VIEWS
from catalog.analytics.views import stream_query
from catalog.errors import UsageError
from catalog.maint.retention import KeepPolicy
from catalog.repo import Repository

from ..console import note, print_json, warn, warn_damaged
from . import Subparsers, command
from .forget_cmd import overlay_bases
from .job_sources import job_targets
from .output import add_output_options, open_output, output_format, write_result

MAX_SIZE_BYTES = 1 << 50
MAX_HORIZON_DAYS = 36500  # a century
_SIZE = re.compile(r"^(\d+)([KMGT]?)(i?B)?$", re.IGNORECASE)


def add_parser(sub: Subparsers) -> None:
    json = 'print {"columns": [...], "rows": [...]} (the same as --format json)'
    s = command(
        sub,
        "query",
        "run one read-only DuckDB SQL query over the catalog views (`catalog-schema`)",
        [
            'comb -r /backup/repo query "SELECT id, time, bytes_stored FROM points ORDER BY time"',
            'comb -r /backup/repo query "SELECT sum(bytes_stored) AS stored FROM points" --json',
            'comb -r /backup/repo query "SELECT * FROM point_usage" --format parquet '
            "--output usage.parquet",
        ],
        json,
    )
    s.add_argument("sql", help="one SELECT statement")
    add_output_options(s, with_parquet=True)
    s.set_defaults(run=cmd_query)

    s = command(
        sub,
        "report",
        "a named analytics report over the history (`report --list`)",
        [
            "comb -r /backup/repo report --list",
            "comb -r /backup/repo report growth --period week",
            "comb -r /backup/repo report retention --keep-daily 7 --keep-weekly 4 --json",
        ],
        json,
    )
    s.add_argument("name", nargs="?", help="report name")
    s.add_argument("--list", action="store_true", help="list the reports")
    s.add_argument("--source", help="only this source")
    s.add_argument("--since", help="only points from this date/time on (ISO, UTC)")
    s.add_argument(
        "--period",
        choices=["day", "week", "month"],
        default="day",
        help="growth, ratios: the period of a row (default day)",
    )
    s.add_argument("--bucket", help="hot-regions: region size (e.g. 1G, 256M)")
    s.add_argument("--limit", type=int, default=20, help="hot-regions: rows (0 = all)")
    s.add_argument(
        "--horizons", default="30,90,365", help="projection: days ahead, comma-separated"
    )
    for rule in KeepPolicy.__dataclass_fields__:
        s.add_argument(
            f"--keep-{rule}",
            type=int,
            default=0,
            metavar="N",
            help=f"retention: keep rule as in `forget --keep-{rule}`",
        )
    forget = "retention: forget this point too (repeatable)"
    s.add_argument("--forget", action="append", default=[], metavar="POINT", help=forget)
    s.add_argument("--job", metavar="FILE", help=JOB_HELP + " (rpo)")
    add_output_options(s, with_parquet=False)
    s.set_defaults(run=cmd_report)

    s = command(
        sub,
        "dashboard",
        "write a self-contained HTML page with the history's charts",
        ["comb -r /backup/repo dashboard history.html"],
        json="print the file written as one JSON object",
    )
    s.add_argument("output", help="HTML file to write")
    s.add_argument("--job", metavar="FILE", help=JOB_HELP)
    s.set_defaults(run=cmd_dashboard)

    s = command(
        sub,
        "catalog-schema",
        "list the catalog views, their columns, types and meanings",
        ["comb -r /backup/repo catalog-schema"],
        json='print {"views": [...]}',
    )
    s.set_defaults(run=cmd_catalog_schema)


def _open(r: Repository) -> Catalog:
    points = r.points()
    warn_damaged(r)
    return Catalog.open(r.storage, points)


def _warn_left_out(cat: Catalog) -> None:
    for msg in dict.fromkeys([*cat.damaged, *cat.history.damaged]):
        warn(f"left out of the views: {msg}")


def cmd_query(repo: str, args: argparse.Namespace) -> int:
    cat = _open(Repository.open(repo, password=args.password))
    cat.need(args.sql)
    _warn_left_out(cat)
    write_result(stream_query(cat.con, args.sql), output_format(args), args.output)
    return 0


def parse_size(text: str) -> int:
    m = _SIZE.match(text.strip())
    if not m:
        raise UsageError(f"bad size {text!r} (e.g. 1G, 256M, 65536)")
    size = int(m.group(1)) << (10 * " KMGT".index(m.group(2).upper() or " "))
    if not 0 < size <= MAX_SIZE_BYTES:
        raise UsageError(f"size {text!r} out of range (1 byte to 1 PiB)")
    return size


def parse_since(text: str) -> datetime:
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"bad --since {text!r} (ISO date or time, e.g. 2026-11-01)") from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


JOB_HELP = "a job file: each source's `every` is its recovery point objective, kept or missed"


def report_options(args: argparse.Namespace) -> ReportOptions:
    try:
        horizons = tuple(int(h) for h in args.horizons.split(",") if h.strip())
    except ValueError:
        raise UsageError(f"bad --horizons {args.horizons!r} (days, e.g. 30,90,365)") from None
    if not horizons or any(not 0 < h <= MAX_HORIZON_DAYS for h in horizons):
        raise UsageError(f"--horizons must be days between 1 and {MAX_HORIZON_DAYS}")
    keep = {r: getattr(args, f"keep_{r}") for r in KeepPolicy.__dataclass_fields__}
    if any(v < 0 for v in keep.values()) or args.limit < 0:
        raise UsageError("counts must not be negative")
    return ReportOptions(
        source=args.source,
        since=parse_since(args.since) if args.since else None,
        period=args.period,
        bucket_bytes=parse_size(args.bucket) if args.bucket else None,
        limit=args.limit or None,
        horizons=horizons,
        policy=KeepPolicy(**keep),
        forget=tuple(args.forget),
    )


def cmd_report(repo: str, args: argparse.Namespace) -> int:
    if args.list:
        width = max(len(n) for n in REPORTS)
        for name, report in REPORTS.items():
            print(f"{name.ljust(width)}  {report.help}")
        return 0
    if not args.name:
        raise UsageError("give a report name (see `comb report --list`)")
    fmt = output_format(args)
    opts = report_options(args)
    r = Repository.open(repo, password=args.password)
    if getattr(args, "job", None):
        opts = replace(opts, targets=job_targets(args.job, r.points()))
    if args.name == "retention":  # as `forget` does: the base of an overlay is kept
        opts = replace(opts, held=frozenset(overlay_bases(r)))
    cat = _open(r)
    if opts.source is not None and opts.source not in cat.history.sources:
        raise UsageError(f"no recovery point for source {opts.source!r}")
    result = run_report(cat, args.name, opts)
    _warn_left_out(cat)
    for text in result.notes:
        note(text)
    reader = pa.RecordBatchReader.from_batches(result.table.schema, result.table.to_batches())
    head = {"report": args.name, "notes": list(result.notes)}
    write_result(reader, fmt, args.output, human=True, head=head)
    return 0


def cmd_dashboard(repo: str, args: argparse.Namespace) -> int:
    from catalog.analytics.dashboard.data import dashboard_data
    from catalog.analytics.dashboard.render import render_dashboard

    r = Repository.open(repo, password=args.password)
    targets = job_targets(args.job, r.points())
    cat = _open(r)
    page = render_dashboard(dashboard_data(cat, os.path.abspath(repo), targets=targets))
    _warn_left_out(cat)
    with open_output(args.output, binary=False) as out:
        out.write(page)
    if args.json:
        print_json({"output": args.output, "points_shown": len(cat.history.points)})
    else:
        print(f"wrote {args.output} ({len(cat.history.points)} points)")
    return 0


def cmd_catalog_schema(repo: str, args: argparse.Namespace) -> int:
    """The views with their columns' types (from DuckDB itself) and meanings."""
    r = Repository.open(repo, password=args.password)
    cat = Catalog.open(r.storage, [])
    views: list[dict[str, Any]] = []
    for view, (about, columns) in VIEWS.items():
        cat.need(view)
        described = cat.con.execute(f"DESCRIBE {view}").fetchall()
        views.append(
            {
                "view": view,
                "about": about,
                "columns": [
                    {"name": name, "type": typ, "about": columns.get(name, "")}
                    for name, typ, *_ in described
                ],
            }
        )
    if args.json:
        print_json({"views": views})
        return 0
    for v in views:
        print(f"{v['view']}: {v['about']}")
        for c in v["columns"]:
            print(f"  {c['name']:<18} {c['type']:<26} {c['about']}")
        print()
    return 0
