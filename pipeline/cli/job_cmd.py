"""``comb job run FILE``, ``job serve FILE`` and ``job status FILE``: a job file's sources
(``pipeline.jobs.jobfile``) backed up in one engine run when due, then each source's keep rules
applied (a round; ``job serve``, in ``job_serve``, runs rounds on the schedule); and each
source's last backup against its RPO (``every``), its last run and the server's state.

Owns the command's side: which sources are due, a round, the report and the JSON. Must not:
parse job files, keep their state or run backups itself (``pipeline.jobs``).
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from catalog.errors import CombError, SourceError, UsageError
from catalog.maint.forget import forget
from catalog.repo import Repository
from catalog.store.points import RecoveryPoint

from ..console import print_json, print_table, waiting, warn
from ..engines import Engine
from ..jobs.backup import run_backups, same_source
from ..jobs.jobfile import JobSource, expand, load_job
from ..jobs.jobstate import JobState, job_lock, lock_holder, lock_path, state_path
from ..jobs.runner import BackupOptions
from ..jobs.vsphere_backup import run_vsphere_backup
from ..locking import command_line
from ..profile import stage_seconds, summed
from . import Parser, Subparsers, command
from .backup_cmd import (
    add_engine_options,
    add_timeline_option,
    engine_for,
    save_timeline,
    say_engine,
)
from .catalog_cmd import index_after_backup
from .forget_cmd import overlay_bases
from .job_sources import list_vms, vm_opts, vms_with_points, vsphere_password_once
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
        dest="action", metavar="ACTION", parser_class=Parser, help="run, serve or status"
    )
    run = command(
        acts,
        "run",
        "back up every source that is due (once), then apply each one's keep rules",
        ["comb -r /backup/repo job run jobs.toml --engine local --json"],
        json='print {"sources": [...]}',
    )
    serve = command(
        acts,
        "serve",
        "stay up: back up each source when it is due, on a warm engine, until SIGTERM",
        ["comb -r /backup/repo job serve /etc/comb/jobs.toml"],
        json="print each round as one JSON line",
    )
    st = command(
        acts,
        "status",
        "each source's last backup, its age against `every` (RPO kept or missed), next run",
        ["comb -r /backup/repo job status jobs.toml --json"],
        json='print {"sources": [...], "serve": {...}}',
    )
    for p in (run, serve, st):
        p.add_argument("file", metavar="FILE", help="the job file (TOML)")
        p.add_argument(
            "--state",
            metavar="PATH",
            default=None,
            help="the job's state file (default: one per job file and repository under "
            "$COMB_STATE_DIR, else ~/.local/state/comb)",
        )
    add_engine_options(run)
    add_timeline_option(run)
    add_engine_options(serve)
    s.set_defaults(run=cmd_job)


def _status(
    src: JobSource, last: RecoveryPoint | None, now: datetime, state: JobState
) -> dict[str, object]:
    age = None if last is None else round(src.age(last, now), 1)
    every = src.every_s
    due_at = None
    if last is not None and every is not None and age is not None and age >= 0:
        due_at = max(now, now + timedelta(seconds=every - age))  # (overdue: now)
    rpo = None
    if every is not None:
        rpo = "missed" if age is None or age > every else "unknown" if age < 0 else "kept"
    run = state.last_run(src.name)
    return {
        "source": src.name,
        "path": src.path,
        "every_seconds": every,
        "last_point": None if last is None else last.id,
        "last_time": None if last is None else last.time,
        "age_seconds": age,
        "rpo": rpo,
        "next_due": None if due_at is None else due_at.isoformat(timespec="seconds"),
        "last_run": run.get("began"),
        "last_run_status": run.get("status"),
        "last_error": run.get("error"),
    }


@dataclass
class Round:
    """One round of a job: every source's line, and what went wrong."""

    docs: list[dict[str, object]] = field(default_factory=list)
    forgotten: list[str] = field(default_factory=list)
    failed: list[tuple[str, CombError]] = field(default_factory=list)
    unkept: list[CombError] = field(default_factory=list)
    due: int = 0
    startup_s: float = 0.0
    stage_seconds: dict[str, float] | None = None  # the engine run's (``pipeline.profile``)


def run_round(
    r: Repository, sources: list[JobSource], due: list[JobSource], engine: Engine,
    args: argparse.Namespace, why: dict[str, str] | None = None,
) -> Round:  # fmt: skip
    """Back up ``due`` in one engine run (a VM: one each), index their files, apply their keep
    rules; a glob in ``due`` fails (``why``: the reason ``expand`` gave)."""
    why = why or {}
    made: list[RecoveryPoint] = []
    rnd = Round(due=len(due))
    # (a glob left is one that matched nothing: ``expand`` says why)
    rnd.failed = [(s.path, SourceError(why.get(s.path, "matches nothing"))) for s in due
                  if s.pattern]  # fmt: skip
    files = [s for s in due if not s.pattern and s.vsphere is None]
    vms = [s for s in due if s.vsphere is not None and not s.pattern]
    by_vm: dict[str, list[RecoveryPoint]] = {}
    if files or vms:
        opts = BackupOptions(batch_bytes=args.batch_mib * 1024 * 1024)
        # (a warm engine's last run must not count when no source gets as far as the engine)
        engine.cpu_by_stage, engine.wall_by_stage, engine.timeline = {}, {}, []
        engine.startup_s = 0.0
        cpu, wall = [], []
        with progress_bar(f"job {len(due)} sources", args.json, starting="starting ...") as bar:
            if files:
                made, failed = run_backups(
                    r, [s.path for s in files], engine, opts, bar, [s.name for s in files],
                    [s.node for s in files],
                )  # fmt: skip
                rnd.failed += failed
                cpu.append(engine.cpu_by_stage)
                wall.append(engine.wall_by_stage)
            for vm in vms:  # (one engine run each: a VM's disks come from one snapshot)
                try:
                    by_vm[vm.path] = run_vsphere_backup(r, vm.path, engine, opts, vm_opts(vm), bar)
                except CombError as err:
                    rnd.failed.append((vm.path, err))
                    continue
                except Exception as err:  # noqa: BLE001 - one VM's bug must not take the others
                    warn(f"VM {vm.name}: {type(err).__name__}: {err}", loud=True)
                    rnd.failed.append((vm.path, SourceError(f"{type(err).__name__}: {err}")))
                    continue
                made += by_vm[vm.path]
                cpu.append(engine.cpu_by_stage)
                wall.append(engine.wall_by_stage)
        rnd.startup_s = engine.startup_s
        if any(wall):  # (null: the engine did not run)
            rnd.stage_seconds = stage_seconds(summed(cpu), summed(wall))
        say_engine(engine)
    catalogs = index_after_backup(r, made, args.json)
    by_path = {p.source_path: p for p in made}
    errors = dict(rnd.failed)
    for src in sources:
        points = by_vm.get(src.path) or [p for p in [by_path.get(src.path)] if p is not None]
        doc: dict[str, object] = {"source": src.name, "path": src.path}
        if src not in due:
            doc["status"] = "not due"
        elif points:
            doc.update(status="backed up", point=points[0].id, mode=points[0].mode,
                       bytes_read=sum(p.stats.bytes_read for p in points),
                       bytes_new=sum(p.stats.bytes_new for p in points),
                       seconds=max(p.stats.seconds for p in points),
                       file_catalog=catalogs.get(points[0].id))  # fmt: skip
            if src.vsphere is not None:
                doc["points"] = [p.id for p in points]  # (one per disk)
        else:
            error = errors.get(src.path)
            doc.update(status="failed", error=error.message if error else "not backed up")
        if points and src.policy.any():
            _keep_rules(r, src, sorted({p.source for p in points}), doc, rnd)
        rnd.docs.append(doc)
    return rnd


def _keep_rules(
    r: Repository, src: JobSource, names: list[str], doc: dict[str, object], rnd: Round
) -> None:
    """``forget`` with the source's rules, for each source name its points have (a VM: one per
    disk); a failure is reported with the others' results."""
    gone: list[str] = []
    for name in names:
        try:
            res = forget(r, src.policy, (), name, False, lambda: overlay_bases(r),
                         command_line(), waiting)  # fmt: skip
        except CombError as lost:  # (the other disks' rules are applied all the same)
            doc["forget_error"] = lost.message
            rnd.unkept.append(lost)
            continue
        gone += [p.id for p in res.gone]
    rnd.forgotten += gone
    doc["forgotten"] = gone


def report_round(rnd: Round, as_json: bool, extra: dict[str, object]) -> None:
    if as_json:
        print_json({"sources": rnd.docs, "forgotten": rnd.forgotten, **extra})
    else:
        for doc in rnd.docs:
            what = doc.get("point") or doc.get("error") or ""
            print(f"{doc['source']}: {doc['status']}" + (f" {what}" if what else ""), flush=True)
    for path, err in rnd.failed:
        warn(f"source {path} failed: {err.message}")
    for error in rnd.unkept:
        warn(f"keep rules not applied: {error.message}")


def cmd_job(repo: str, args: argparse.Namespace) -> int:
    if args.action is None:
        raise UsageError("give an action: `job run FILE`, `job serve FILE` or `job status FILE`")
    spec = load_job(args.file)
    same = same_source([src.path for src in spec if not src.pattern and src.vsphere is None])
    if same is not None:
        raise UsageError(f"job file {args.file}: {same[0]} and {same[1]} are one source")
    if args.action == "serve":
        from .job_serve import serve

        return serve(repo, args, spec)
    engine = engine_for(args) if args.action == "run" else None  # (options checked first)
    if engine is not None:
        placed(spec, engine, args.file)
        if any(s.vsphere is not None for s in spec):
            vsphere_password_once()  # (asked now, not in the middle of a round)
    r = Repository.open(repo, password=args.password)
    path = state_path(args.file, r.location, args.state)
    lock = lock_path(args.file, r.location)
    now = datetime.now(UTC)
    if engine is None:
        state = JobState(path)
        points = r.points()
        latest = latest_points(points)
        sources, _ = expand(spec, vms_with_points(points))
        rows = [_status(s, s.latest(latest), now, state) for s in sources]
        _print_status(rows, serving(state, lock), args)
        return 0
    with job_lock(lock, args.file, "comb job run"):
        sources, why = expand(spec, list_vms)
        latest = latest_points(r.points())
        due = [src for src in sources if src.due(src.latest(latest), now)]
        t0 = time.perf_counter()
        rnd = run_round(r, sources, due, engine, args, why)
        seconds = round(time.perf_counter() - t0, 3)
        report_round(rnd, args.json, {"seconds": seconds, "stage_seconds": rnd.stage_seconds})
        state = JobState(path)
        state.record(rnd.docs, now.isoformat(timespec="seconds"))
        state.doc["job_file"] = os.path.abspath(args.file)
        state.save()
    if engine.wall_by_stage:
        save_timeline(engine, args)
    return round_exit(rnd)


def placed(sources: list[JobSource], engine: Engine, file: str) -> None:
    """A source with a ``node`` needs Ray: threads run on this machine only."""
    pinned = next((s for s in sources if s.node is not None), None)
    if pinned is not None and engine.name != "ray":
        raise UsageError(
            f"job file {file}: source {pinned.name!r} is placed on node {pinned.node!r}; "
            "placement needs the ray engine"
        )


def latest_points(points: list[RecoveryPoint]) -> dict[str, RecoveryPoint]:
    """Each source's latest point."""
    out: dict[str, RecoveryPoint] = {}
    for p in points:
        if p.source not in out or (p.time, p.id) > (out[p.source].time, out[p.source].id):
            out[p.source] = p
    return out


def round_exit(rnd: Round) -> int:
    if rnd.failed:
        raise SourceError(f"{len(rnd.failed)} of {rnd.due} due sources failed (named above)")
    if rnd.unkept:
        raise rnd.unkept[0]
    return 0


def serving(state: JobState, lock: str) -> dict[str, object] | None:
    """The ``job serve`` the state names, and whether it runs now (``alive``: it holds the job
    lock; None: no server ever ran the file)."""
    server = state.doc.get("server")
    if server is None:
        return None
    holder = lock_holder(lock) or ""
    return {**server, "alive": f"pid {server.get('pid')} (comb job serve)" in holder}


def _print_status(
    rows: list[dict[str, object]], server: dict[str, object] | None, args: argparse.Namespace
) -> None:
    if args.json:
        print_json({"sources": rows, "serve": server})
        return
    if server is not None:
        what = f"{server.get('state')}, round {server.get('round')}"
        what += f", last seen {server.get('heartbeat')}"
        who = f"pid {server.get('pid')} on {server.get('host')} since {server.get('since')}"
        if server["alive"]:
            print(f"served by {who} ({what})")
        else:
            print(f"not served (the last server: {who}, {what})")
    print_table(
        ["SOURCE", "LAST", "AGE", "EVERY", "RPO", "NEXT DUE", "LAST RUN"],
        [[str(d["source"]), str(d["last_point"] or "-"), _secs(d["age_seconds"]),
          _secs(d["every_seconds"]), str(d["rpo"] or "-"), str(d["next_due"] or "now"),
          _last_run(d)]
         for d in rows],
    )  # fmt: skip


def _last_run(row: dict[str, object]) -> str:
    if row["last_run_status"] is None:
        return "-"
    if row["last_run_status"] == "failed":
        return f"failed {row['last_run']}: {row['last_error']}"
    return f"{row['last_run_status']} {row['last_run']}"


def _secs(value: object) -> str:
    if not isinstance(value, int | float):
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if value >= size:
            return f"{value / size:.1f}{unit}"
    return f"{value:.0f}s"
