"""``comb job run FILE`` and ``comb job status FILE``: a job file's sources (``pipeline.jobs.
jobfile``) backed up in one engine run when due, then each source's keep rules applied; and
each source's last backup against its RPO (``every``).

Owns the command's side: which sources are due, the report and the JSON. Must not: parse job
files or run backups itself (``pipeline.jobs``).
"""

from __future__ import annotations

import argparse
import time
from datetime import UTC, datetime, timedelta

from catalog.errors import CombError, SourceError, UsageError
from catalog.maint.forget import forget
from catalog.repo import Repository
from catalog.store.points import RecoveryPoint

from ..console import print_json, print_table, waiting, warn
from ..jobs.backup import run_backups, same_source
from ..jobs.jobfile import JobSource, load_job
from ..jobs.runner import BackupOptions
from ..locking import command_line
from . import Parser, Subparsers, command
from .backup_cmd import add_engine_options, engine_for, say_engine
from .catalog_cmd import index_after_backup
from .forget_cmd import overlay_bases
from .progress import progress_bar


def add_parser(sub: Subparsers) -> None:
    s = command(
        sub,
        "job",
        "back up a job file's sources that are due, in one engine run; or show their RPO",
        ["comb -r /backup/repo job run jobs.toml", "comb -r /backup/repo job status jobs.toml"],
        json="print the result as one JSON object",
    )
    acts = s.add_subparsers(
        dest="action", metavar="ACTION", parser_class=Parser, help="run or status"
    )
    run = command(
        acts,
        "run",
        "back up every source that is due (once), then apply each one's keep rules",
        ["comb -r /backup/repo job run jobs.toml --engine local --json"],
        json='print {"sources": [...]}',
    )
    run.add_argument("file", metavar="FILE", help="the job file (TOML)")
    add_engine_options(run)
    st = command(
        acts,
        "status",
        "each source's last backup, its age against `every` (RPO kept or missed) and next run",
        ["comb -r /backup/repo job status jobs.toml --json"],
        json='print {"sources": [...]}',
    )
    st.add_argument("file", metavar="FILE", help="the job file (TOML)")
    s.set_defaults(run=cmd_job)


def _latest(points: list[RecoveryPoint], name: str) -> RecoveryPoint | None:
    mine = [p for p in points if p.source == name]
    return max(mine, key=lambda p: (p.time, p.id)) if mine else None


def _status(src: JobSource, last: RecoveryPoint | None, now: datetime) -> dict[str, object]:
    age = None if last is None else round(src.age(last, now), 1)
    every = src.every_s
    due_at = None
    if last is not None and every is not None and age is not None and age >= 0:
        due_at = max(now, now + timedelta(seconds=every - age))  # (overdue: now)
    rpo = None
    if every is not None:
        rpo = "missed" if age is None or age > every else "unknown" if age < 0 else "kept"
    return {
        "source": src.name,
        "path": src.path,
        "every_seconds": every,
        "last_point": None if last is None else last.id,
        "last_time": None if last is None else last.time,
        "age_seconds": age,
        "rpo": rpo,
        "next_due": None if due_at is None else due_at.isoformat(timespec="seconds"),
    }


def cmd_job(repo: str, args: argparse.Namespace) -> int:
    if args.action is None:
        raise UsageError("give an action: `comb job run FILE` or `comb job status FILE`")
    sources = load_job(args.file)
    same = same_source([src.path for src in sources])
    if same is not None:
        raise UsageError(f"job file {args.file}: {same[0]} and {same[1]} are one source")
    engine = engine_for(args) if args.action == "run" else None  # (options checked first)
    r = Repository.open(repo, password=args.password)
    now = datetime.now(UTC)
    points = r.points()
    if engine is None:
        _print_status([_status(src, _latest(points, src.name), now) for src in sources], args)
        return 0
    due = [src for src in sources if src.due(_latest(points, src.name), now)]
    t0 = time.perf_counter()
    made: list[RecoveryPoint] = []
    failed: list[tuple[str, CombError]] = []
    if due:
        with progress_bar(f"job {len(due)} sources", args.json, starting="starting ...") as bar:
            made, failed = run_backups(
                r, [s.path for s in due], engine, BackupOptions(), bar, [s.name for s in due]
            )
        say_engine(engine)
    catalogs = index_after_backup(r, made, args.json)
    by_path = {p.source_path: p for p in made}
    errors = dict(failed)
    out: list[dict[str, object]] = []
    forgotten: list[str] = []
    unkept: list[CombError] = []
    for src in sources:
        point = by_path.get(src.path)
        doc: dict[str, object] = {"source": src.name, "path": src.path}
        if src not in due:
            doc["status"] = "not due"
        elif point is not None:
            doc.update(status="backed up", point=point.id, mode=point.mode,
                       bytes_new=point.stats.bytes_new,
                       file_catalog=catalogs.get(point.id))  # fmt: skip
        else:
            why = errors.get(src.path)
            doc.update(status="failed", error=why.message if why else "not backed up")
        if point is not None and src.policy.any():
            try:
                res = forget(r, src.policy, (), src.name, False, lambda: overlay_bases(r),
                             command_line(), waiting)  # fmt: skip
            except CombError as lost:  # (the others' rounds are reported all the same)
                doc["forget_error"] = lost.message
                unkept.append(lost)
            else:
                forgotten += [p.id for p in res.gone]
                doc["forgotten"] = [p.id for p in res.gone]
        out.append(doc)
    seconds = round(time.perf_counter() - t0, 3)
    if args.json:
        print_json({"sources": out, "forgotten": forgotten, "seconds": seconds})
    else:
        for doc in out:
            what = doc.get("point") or doc.get("error") or ""
            print(f"{doc['source']}: {doc['status']}" + (f" {what}" if what else ""))
    for path, err in failed:
        warn(f"source {path} failed: {err.message}")
    for error in unkept:
        warn(f"keep rules not applied: {error.message}")
    if failed:
        raise SourceError(f"{len(failed)} of {len(due)} due sources failed (named above)")
    if unkept:
        raise unkept[0]
    return 0


def _print_status(rows: list[dict[str, object]], args: argparse.Namespace) -> None:
    if args.json:
        print_json({"sources": rows})
        return
    print_table(
        ["SOURCE", "LAST", "AGE", "EVERY", "RPO", "NEXT DUE"],
        [[str(d["source"]), str(d["last_point"] or "-"), _secs(d["age_seconds"]),
          _secs(d["every_seconds"]), str(d["rpo"] or "-"), str(d["next_due"] or "now")]
         for d in rows],
    )  # fmt: skip


def _secs(value: object) -> str:
    if not isinstance(value, int | float):
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if value >= size:
            return f"{value / size:.1f}{unit}"
    return f"{value:.0f}s"
