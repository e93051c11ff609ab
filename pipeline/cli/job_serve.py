"""``comb job serve FILE``: rounds of ``job run`` on the job file's schedule, on one warm engine
(Ray starts once, not per round) and one open repository (the password is asked once), until
SIGTERM or SIGINT.

Each source is backed up when its ``every`` has passed since its last backup began (exactly:
no timer's slack); one that failed is tried again ``min(every, JOB_RETRY_S)`` after the failed
try. Sources due together, or while a round runs, go in one round (one engine run): a source is
never backed up twice at once, and the job lock keeps ``job run`` and a second ``job serve`` of
the same job file away. A failed round (a lock, the engine, the repository out of reach, even
a bug) is reported and the server goes on; so does a state file it cannot write. SIGHUP
reloads the job file (a bad one is reported and the old one kept). SIGTERM or SIGINT stops it:
a backup not yet committing leaves nothing committed, one committing finishes and is reported;
the exit code is 0. The state (``pipeline.jobs.jobstate``) says what each source last did and
what the server is doing, with a heartbeat, during rounds too. Globs are expanded at every turn
(``jobfile.expand``), globs of VMs listed through vSphere at most every ``VM_LIST_S``.

Owns the schedule loop, reloading and stopping. Must not: back up (``job_cmd.run_round``) or
know the state file's format (``pipeline.jobs.jobstate``).
"""

from __future__ import annotations

import argparse
import os
import socket
import time
from datetime import UTC, datetime

from catalog.errors import CombError, OutputError, UsageError
from catalog.repo import Repository
from catalog.store.points import RecoveryPoint

from .. import signals
from ..console import note, warn
from ..engines import Engine
from ..jobs.backup import same_source
from ..jobs.jobfile import JobSource, expand, load_job
from ..jobs.jobstate import JobState, job_lock, lock_path, now_iso, state_path
from .backup_cmd import engine_for
from .job_cmd import Round, latest_points, placed, report_round, run_round
from .job_sources import list_vms, vsphere_password_once

JOB_RETRY_S = 300.0  # a failed source is tried again after min(every, this)
IDLE_CHECK_S = 10.0  # while idle, the schedule is checked at least this often
VM_LIST_S = 300.0  # a glob of VMs is listed again (vSphere asked) at most this often


def _checked(sources: list[JobSource], file: str) -> list[JobSource]:
    for src in sources:
        if src.every_s is None:
            raise UsageError(
                f"job file {file}: source {src.name!r} has no `every` (job serve needs one for "
                "every source: set it in [defaults] or the source)"
            )
    same = same_source([src.path for src in sources if not src.pattern])
    if same is not None:
        raise UsageError(f"job file {file}: {same[0]} and {same[1]} are one source")
    return sources


def _wait(src: JobSource, last: RecoveryPoint | None, state: JobState, now: datetime) -> float:
    """Seconds until ``src`` is due, counting from its last try too: one that failed waits
    ``min(every, JOB_RETRY_S)``, and one that succeeded its ``every`` even when the latest
    point is dated in the future (a clock set back must not make it due at every turn)."""
    wait = src.due_in(last, now, exact=True)
    run = state.last_run(src.name)
    if run and src.every_s is not None:
        since = now.timestamp() - datetime.fromisoformat(run["began"]).timestamp()
        hold = min(src.every_s, JOB_RETRY_S) if run["status"] == "failed" else src.every_s
        if since >= 0:
            wait = max(wait, hold - since)
    return wait


def serve(repo: str, args: argparse.Namespace, sources: list[JobSource]) -> int:
    sources = _checked(sources, args.file)
    engine = engine_for(args)
    placed(sources, engine, args.file)
    if any(s.vsphere is not None for s in sources):
        vsphere_password_once()  # (asked now, not in the middle of a round)
    engine.keep_warm = True
    r = Repository.open(repo, password=args.password)
    state = JobState(state_path(args.file, r.location, args.state))
    hup = signals.watch_hangup()
    try:
        with job_lock(lock_path(args.file, r.location), args.file, "comb job serve"):
            state.doc.update(job_file=os.path.abspath(args.file), repository=r.location)
            state.doc["server"] = {
                "pid": os.getpid(), "host": socket.gethostname(), "since": now_iso(),
                "engine": engine.name, "round": 0, "running": [], "reload_error": None,
            }  # fmt: skip
            _save(state, state="idle")
            note(f"serving {len(sources)} sources of {args.file} (state: {state.path})")
            state.beat()
            try:
                _loop(r, args, sources, engine, state)
            except KeyboardInterrupt as err:
                note(f"stopped by {err}")
            finally:
                with signals.deferred():
                    state.stop()
                    _save(state, state="stopped", running=[])
                    engine.shutdown()
    finally:
        signals.restore(hup)
    return 0


def _save(job: JobState, /, **server: object) -> None:
    try:
        job.save(**server)
    except OutputError as err:  # (the backups matter more than their record: on it goes)
        warn(err.message)


def _loop(
    r: Repository, args: argparse.Namespace, spec: list[JobSource], engine: Engine,
    state: JobState,
) -> None:  # fmt: skip
    latest: dict[str, RecoveryPoint] = {}
    fresh = False  # ``latest`` was read since the last round
    vms = _VmLists()
    while True:
        if signals.hangup():
            spec = _reload(args.file, spec, state, engine)
        sources, why = expand(spec, vms)  # (globs again: what appeared is a source now)
        now = datetime.now(UTC)
        wait = min(_wait(s, s.latest(latest), state, now) for s in sources)
        if wait > 0 and fresh:
            signals.nap(min(wait, IDLE_CHECK_S))
            continue
        try:
            latest, fresh = latest_points(r.points()), True  # (what other backups committed)
        except CombError as err:  # (the repository out of reach: tried again a while later)
            warn(f"cannot read the recovery points: {err.message}")
            signals.nap(min(JOB_RETRY_S, *(s.every_s or JOB_RETRY_S for s in sources)))
            continue
        due = [s for s in sources if _wait(s, s.latest(latest), state, now) <= 0]
        if due:
            _round(r, args, sources, due, engine, state, now, why)
            fresh = False


class _VmLists:
    """What each glob of VMs matched, asked of vSphere at most every ``VM_LIST_S`` (the
    schedule is checked every few seconds; new VMs need not be seen that soon)."""

    def __init__(self) -> None:
        self._got: dict[str, tuple[float, list[tuple[str, str]] | CombError]] = {}

    def __call__(self, src: JobSource) -> list[tuple[str, str]]:
        when, got = self._got.get(src.path, (-VM_LIST_S, []))
        if time.monotonic() - when >= VM_LIST_S:
            try:
                got = list_vms(src)
            except CombError as err:
                got = err
            self._got[src.path] = (time.monotonic(), got)
        if isinstance(got, CombError):
            raise got
        return got


def _round(
    r: Repository, args: argparse.Namespace, sources: list[JobSource], due: list[JobSource],
    engine: Engine, state: JobState, now: datetime, why: dict[str, str],
) -> None:  # fmt: skip
    n = state.server["round"] + 1
    _save(state, state="running", round=n, running=[s.name for s in due])
    began, t0 = now.isoformat(timespec="milliseconds"), time.perf_counter()
    try:
        rnd = run_round(r, sources, due, engine, args, why)
    except (CombError, Exception) as err:  # noqa: BLE001 - a round's failure is not the server's
        text = err.message if isinstance(err, CombError) else f"{type(err).__name__}: {err}"
        warn(f"round {n} failed: {text}", loud=not isinstance(err, CombError))
        engine.close(True)  # (a round cut short by a bug: the next starts afresh)
        rnd = Round(due=len(due), docs=[
            {"source": s.name, "path": s.path, "status": "failed", "error": text} for s in due
        ])  # fmt: skip
    state.record(rnd.docs, began)
    _save(state, state="idle", running=[], last_round=began)
    rnd.docs = [d for d in rnd.docs if d["status"] != "not due"]
    seconds = round(time.perf_counter() - t0, 3)
    extra = {"round": n, "began": began, "seconds": seconds,
             "engine_startup_seconds": round(rnd.startup_s, 3),
             "stage_seconds": rnd.stage_seconds}  # fmt: skip
    if not args.json:
        ok = sum(d["status"] == "backed up" for d in rnd.docs)
        print(f"{began} round {n}: {ok} of {rnd.due} backed up in {seconds:.1f} s "
              f"(engine start-up {rnd.startup_s:.1f} s)", flush=True)  # fmt: skip
    report_round(rnd, args.json, extra)
    late = signals.release()  # (a signal during the commit waited for it and this report)
    if late is not None:
        raise signals.Interrupted(late)


def _reload(
    file: str, sources: list[JobSource], state: JobState, engine: Engine
) -> list[JobSource]:
    """The job file read again (SIGHUP); a bad one is reported (also in the state's
    ``reload_error``) and the old one kept."""
    try:
        new = _checked(load_job(file), file)
        placed(new, engine, file)
    except CombError as err:
        warn(f"job file not reloaded (the old one stays): {err.message}")
        _save(state, reloaded=now_iso(), reload_error=err.message)
        return sources
    note(f"reloaded {file}: {len(new)} sources")
    _save(state, reloaded=now_iso(), reload_error=None)
    return new
