"""``comb job serve FILE``: rounds of ``job run`` on the job file's schedule, on one warm engine
(Ray starts once, not per round), until SIGTERM or SIGINT.

Each source is backed up when it is due (``JobSource.due_in``); one that failed is tried again
``min(every, JOB_RETRY_S)`` after the failed try. Sources due together, or while a round runs,
go in one round (one engine run): a source is never backed up twice at once, and the job lock
keeps ``job run`` and a second ``job serve`` of the same job file away. A failed round (a lock,
the engine, the repository) is reported and the next one starts afresh. SIGHUP reloads the job
file (a bad one is reported and the old one kept). SIGTERM or SIGINT stops it: a backup not yet
committing leaves nothing committed, one committing finishes and is reported; the exit code is 0.
The state file (``pipeline.jobs.jobstate``) says, all along, what each source last did and what
the server is doing, with a heartbeat every ``HEARTBEAT_S``.

Owns the schedule loop, reloading and stopping. Must not: back up (``job_cmd.run_round``) or
write the state file's format itself (``pipeline.jobs.jobstate``).
"""

from __future__ import annotations

import argparse
import os
import socket
import time
from datetime import UTC, datetime
from typing import Any

from catalog.errors import CombError, UsageError
from catalog.repo import Repository
from catalog.store.points import RecoveryPoint

from .. import signals
from ..console import note, warn
from ..jobs.backup import same_source
from ..jobs.jobfile import JobSource, load_job
from ..jobs.jobstate import job_lock, now_iso, read_state, state_path, write_state
from .backup_cmd import engine_for
from .job_cmd import Round, record_round, report_round, run_round

JOB_RETRY_S = 300.0  # a failed source is tried again after min(every, this)
HEARTBEAT_S = 10.0  # the state file's heartbeat while idle


def _checked(sources: list[JobSource], file: str) -> list[JobSource]:
    for src in sources:
        if src.every_s is None:
            raise UsageError(
                f"job file {file}: source {src.name!r} has no `every` (job serve needs one for "
                "every source: set it in [defaults] or the source)"
            )
    same = same_source([src.path for src in sources])
    if same is not None:
        raise UsageError(f"job file {file}: {same[0]} and {same[1]} are one source")
    return sources


def _wait(
    src: JobSource, last: RecoveryPoint | None, state: dict[str, Any], now: datetime
) -> float:
    """Seconds until ``src`` is due, counting from its last try too: one that failed waits
    ``min(every, JOB_RETRY_S)``, and one that succeeded its ``every`` even when the latest
    point is dated in the future (a clock set back must not make it due at every turn)."""
    wait = src.due_in(last, now)
    run = state.get("sources", {}).get(src.name) or {}
    if isinstance(run.get("began"), str) and src.every_s is not None:
        since = now.timestamp() - datetime.fromisoformat(run["began"]).timestamp()
        failed = run.get("status") == "failed"
        hold = min(src.every_s, JOB_RETRY_S) if failed else src.every_s - src.slack
        if since >= 0:
            wait = max(wait, hold - since)
    return wait


def _latest(points: list[RecoveryPoint]) -> dict[str, RecoveryPoint]:
    out: dict[str, RecoveryPoint] = {}
    for p in points:
        if p.source not in out or (p.time, p.id) > (out[p.source].time, out[p.source].id):
            out[p.source] = p
    return out


def serve(repo: str, args: argparse.Namespace, sources: list[JobSource]) -> int:
    sources = _checked(sources, args.file)
    engine = engine_for(args)
    engine.keep_warm = True
    r = Repository.open(repo, password=args.password)
    path = state_path(args.file, r.location, args.state)
    hup = signals.watch_hangup()
    try:
        with job_lock(path, args.file, "comb job serve"):
            state = read_state(path)
            server: dict[str, Any] = {
                "pid": os.getpid(), "host": socket.gethostname(), "since": now_iso(),
                "engine": engine.name, "state": "idle", "round": 0, "heartbeat": now_iso(),
            }  # fmt: skip
            state.update(job_file=os.path.abspath(args.file), repository=r.location, server=server)
            write_state(path, state)
            note(f"serving {len(sources)} sources of {args.file} (state: {path})")
            try:
                _loop(repo, args, sources, engine, state, path)
            except KeyboardInterrupt as err:
                note(f"stopped by {err}")
            finally:
                server.update(state="stopped", heartbeat=now_iso(), running=[])
                with signals.deferred():
                    write_state(path, state)
                    engine.shutdown()
    finally:
        signals.restore(hup)
    return 0


def _loop(
    repo: str, args: argparse.Namespace, sources: list[JobSource], engine: Any,
    state: dict[str, Any], path: str,
) -> None:  # fmt: skip
    server = state["server"]
    latest: dict[str, RecoveryPoint] = {}
    fresh = False  # ``latest`` was read since the last round
    while True:
        if signals.hangup():
            sources = _reload(args.file, sources, server)
            write_state(path, state)
        now = datetime.now(UTC)
        waits = {s.name: _wait(s, latest.get(s.name), state, now) for s in sources}
        if min(waits.values()) > 0 and fresh:
            signals.nap(min(min(waits.values()), HEARTBEAT_S))
            server["heartbeat"] = now_iso()
            write_state(path, state)
            continue
        r = Repository.open(repo, password=args.password)  # (what other backups committed)
        latest, fresh = _latest(r.points()), True
        due = [s for s in sources if _wait(s, latest.get(s.name), state, now) <= 0]
        if not due:
            continue
        server.update(state="running", round=server["round"] + 1, heartbeat=now_iso(),
                      running=[s.name for s in due])  # fmt: skip
        write_state(path, state)
        began, t0 = now.isoformat(timespec="seconds"), time.perf_counter()
        try:
            rnd = run_round(r, sources, due, engine, args)
        except CombError as err:  # the whole round (a lock, the engine, the repository)
            warn(f"round {server['round']} failed: {err.message}")
            rnd = Round(due=len(due), docs=[
                {"source": s.name, "path": s.path, "status": "failed", "error": err.message}
                for s in due
            ])  # fmt: skip
        late = signals.release()  # (a signal during a commit waited for it and its report)
        record_round(state, rnd, began)
        server.update(state="idle", heartbeat=now_iso(), running=[], last_round=began)
        write_state(path, state)
        rnd.docs = [d for d in rnd.docs if d["status"] != "not due"]
        seconds = round(time.perf_counter() - t0, 3)
        _say_round(rnd, args, server["round"], began, seconds)
        fresh = False
        if late is not None:
            raise signals.Interrupted(late)


def _say_round(rnd: Round, args: argparse.Namespace, n: int, began: str, seconds: float) -> None:
    extra = {"round": n, "began": began, "seconds": seconds,
             "engine_startup_seconds": round(rnd.startup_s, 3),
             "stage_seconds": rnd.stage_seconds}  # fmt: skip
    if not args.json:
        ok = sum(d["status"] == "backed up" for d in rnd.docs)
        print(f"{began} round {n}: {ok} of {rnd.due} backed up in {seconds:.1f} s "
              f"(engine start-up {rnd.startup_s:.1f} s)", flush=True)  # fmt: skip
    report_round(rnd, args.json, extra)


def _reload(file: str, sources: list[JobSource], server: dict[str, Any]) -> list[JobSource]:
    """The job file read again (SIGHUP); a bad one is reported (also in the state's
    ``reload_error``) and the old one kept."""
    server["reloaded"] = now_iso()
    try:
        new = _checked(load_job(file), file)
    except CombError as err:
        warn(f"job file not reloaded (the old one stays): {err.message}")
        server["reload_error"] = err.message
        return sources
    note(f"reloaded {file}: {len(new)} sources")
    server["reload_error"] = None
    return new
