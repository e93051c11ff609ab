"""A run's profile (``backup --json``, ``--timeline``, ``python -m bench``): CPU and wall seconds
per stage summed over the workers, the breakdown an engineer reads, and the timeline file.

``stage_seconds`` names where a run's worker-seconds went: ``read`` (the reader: the source's
I/O), ``hash`` (the chunker: zero checks and BLAKE3), ``index_wait`` (the deduplicator: asking
the index, the index actor's round trip on Ray), ``compress`` and ``seal`` (the compressor:
zstd, then encryption), ``parity`` (the writer's parity encoding) and ``write`` (the rest of the
writer: packing and writing). Wall seconds, summed over the workers: with W workers, a run of S
seconds has at most W × S of them; CPU-bound parts (seal, parity) are taken from their CPU
seconds. The timeline is chrome://tracing's JSON (also Perfetto's): one complete event per
stage and batch on each worker, plus, on Ray, Ray's own events (``ray.timeline``).

Owns the sums, the breakdown and the timeline's format. Must not: import Ray or time anything
(``stages.base.Fused`` times, the engines collect).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

STAGE_SECONDS = ("read", "hash", "index_wait", "compress", "seal", "parity", "write")


def summed(profiles: Iterable[dict[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for profile in profiles:
        for name, secs in profile.items():
            out[name] = out.get(name, 0.0) + secs
    return out


def stage_seconds(cpu: dict[str, float], wall: dict[str, float]) -> dict[str, float]:
    """The breakdown above from a run's CPU seconds per stage and part, and wall seconds per
    stage (both summed over the workers)."""
    seal, parity = cpu.get("seal", 0.0), cpu.get("parity", 0.0)
    out = {
        "read": wall.get("reader", 0.0),
        "hash": wall.get("chunker", 0.0),
        "index_wait": wall.get("deduplicator", 0.0),
        "compress": max(0.0, wall.get("compressor", 0.0) - seal),
        "seal": seal,
        "parity": parity,
        "write": max(0.0, wall.get("writer", 0.0) - parity),
    }
    return {k: round(v, 6) for k, v in out.items()}


def trace_events(worker: str, spans: Iterable[tuple[str, float, float]]) -> list[dict[str, Any]]:
    """A worker's stage spans as complete events (``ph: X``; times in microseconds)."""
    return [
        {"name": stage, "cat": "comb stage", "ph": "X", "pid": worker, "tid": stage,
         "ts": round(start * 1e6, 1), "dur": round(secs * 1e6, 1)}
        for stage, start, secs in spans
    ]  # fmt: skip


def ray_events_of(
    events: list[dict[str, Any]], job_id: str, since_s: float
) -> list[dict[str, Any]]:
    """Of ``ray.timeline()``'s events (a whole cluster's, since it started), this run's: from
    ``since_s`` on, and of Ray job ``job_id`` (a task id ends with its job's id; a driver's
    worker id begins with it)."""

    def ours(e: dict[str, Any]) -> bool:
        task = str((e.get("args") or {}).get("task_id", ""))
        tid = str(e.get("tid", ""))
        if task:
            return task.endswith(job_id)
        return not tid.startswith("driver:") or tid.removeprefix("driver:").startswith(job_id)

    return [e for e in events if e.get("ts", 0) >= since_s * 1e6 and ours(e)]


def timeline_events(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The events as the timeline file holds them: in time order (``--timeline`` writes them:
    ``pipeline.cli.backup_cmd``)."""
    return sorted(events, key=lambda e: e.get("ts", 0))
