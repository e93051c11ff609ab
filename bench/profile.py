"""The pipeline's own profile: CPU per stage, the sum-of-stages floor, and the efficiency.

Every fused worker counts the CPU time of its thread in each stage, and in the parts of the
stages that split their work (``stages.base.Fused.cpu_by_stage``; the engine sums them over its
workers, ``Engine.cpu_by_stage``). With ``cores`` cores, a pipeline that kept them all busy
with nothing but its stages would run at the **floor**: ``cores / sum(CPU-s per GB)``. The
**efficiency** is the measured MB/s (engine start-up excluded) over the floor: what idle cores,
lock and GIL waits and the driver's own work cost.

Owns: the names the report gives the stages' parts, and the two figures. Must not: run anything.
"""

from __future__ import annotations

import os
from typing import Any

from .report import table
from .runs import BackupRun

# The report's names for the stages and their parts, in pipeline order (unknown ones follow).
NAMES = {
    "reader": "read",
    "zero check": "zero check",
    "hash": "hash (chunk ids)",
    "chunker": "chunking (slices)",
    "deduplicator": "index (dedup claims)",
    "index actor": "index (Ray actor)",
    "compress": "compress (zstd)",
    "seal": "seal (AES-256-GCM)",
    "compressor": "compressor (blob column)",
    "parity": "parity (encode, shard hashes, write)",
    "writer": "write (pack hash, copies, I/O)",
}


def cores() -> int:
    return os.cpu_count() or 1


def stage_rows(run: BackupRun) -> list[tuple[str, float]]:
    """(report name, CPU seconds) in pipeline order."""
    prof = run.cpu_by_stage
    order = [k for k in NAMES if k in prof] + sorted(k for k in prof if k not in NAMES)
    return [(NAMES.get(k, k), prof[k]) for k in order]


def floor_mbps(run: BackupRun) -> float | None:
    """cores / sum of the stages' CPU-s per GB, as MB/s of image; None without a profile."""
    total = sum(run.cpu_by_stage.values())
    if total <= 0:
        return None
    return cores() * run.image_bytes / total / 1e6


def efficiency(run: BackupRun) -> float | None:
    floor = floor_mbps(run)
    return run.mbps_work / floor if floor else None


def profile_table(runs: list[BackupRun]) -> str:
    """One column per run: each stage's CPU-s per GB, their sum, the floor and the efficiency."""
    runs = [r for r in runs if sum(r.cpu_by_stage.values()) > 0]
    names: list[str] = []
    for run in runs:
        names += [n for n, _ in stage_rows(run) if n not in names]
    per_run = [dict(stage_rows(run)) for run in runs]
    rows: list[list[Any]] = []
    for name in names:
        rows.append(
            [name] + [_per_gb(p.get(name, 0.0), r) for p, r in zip(per_run, runs, strict=True)]
        )
    rows.append(
        ["sum of stages"]
        + [_per_gb(sum(p.values()), r) for p, r in zip(per_run, runs, strict=True)]
    )
    rows.append(["whole run (all processes)"] + [f"{r.cpu_s_per_gb:.2f}" for r in runs])
    rows.append([f"floor MB/s ({cores()} cores / sum)"] + [f"{floor_mbps(r):.0f}" for r in runs])
    rows.append(["measured MB/s (excl. start-up)"] + [f"{r.mbps_work:.0f}" for r in runs])
    rows.append(["efficiency (measured / floor)"] + [f"{efficiency(r):.0%}" for r in runs])
    header = ["CPU-s per GB of image"] + [r.label for r in runs]
    return table("the pipeline's profile (full backup; its own per-stage CPU)", header, rows)


def _per_gb(secs: float, run: BackupRun) -> str:
    return f"{secs / (run.image_bytes / 1e9):.3f}"


def to_json(run: BackupRun) -> dict[str, Any]:
    return {
        "cpu_s_by_stage": {k: round(v, 3) for k, v in run.cpu_by_stage.items()},
        "floor_mbps": round(floor_mbps(run) or 0.0, 1),
        "efficiency": round(efficiency(run) or 0.0, 3),
        "cores": cores(),
    }
