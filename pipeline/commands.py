"""One function per CLI command: parse nothing, print results, raise CombError on failure."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from typing import Any

import drive.overlays.overlay as overlay
from catalog.errors import CorruptionError, UsageError
from catalog.maint.check import check_repository, summary
from catalog.repo import Repository
from catalog.store.format import DEFAULT_CHUNK_SIZE_BYTES
from catalog.store.parity import ParityGeometry
from catalog.store.points import RecoveryPoint

from .analytics_cmds import cmd_catalog_schema, cmd_dashboard, cmd_query, cmd_report
from .backup import BackupOptions, run_backup
from .boot_cmd import cmd_boot
from .drive_cmds import cmd_export
from .engines import Engine, make_engine
from .keys_cmd import cmd_key
from .lifecycle import (
    cmd_forget,
    cmd_locks,
    cmd_prune,
    cmd_repair,
    cmd_scrub,
    cmd_unlock,
    reader_lock,
)
from .mount_cmd import cmd_mount
from .output import human_bytes
from .overlays_cmd import cmd_overlays
from .progress import progress_bar
from .restore import restore_point
from .serve_cmd import cmd_serve
from .vsphere import is_vsphere
from .vsphere_backup import DEFAULT_AUDIT_PERCENT, VsphereOptions, run_vsphere_backup

__all__ = [
    "cmd_boot",
    "cmd_forget",
    "cmd_key",
    "cmd_locks",
    "cmd_prune",
    "cmd_repair",
    "cmd_scrub",
    "cmd_unlock",
    "cmd_catalog_schema",
    "cmd_dashboard",
    "cmd_export",
    "cmd_mount",
    "cmd_overlays",
    "cmd_query",
    "cmd_report",
    "cmd_serve",
]


def _json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))


# Work items are read into one buffer per worker: bound it (1 GiB per worker at most).
MAX_BATCH_MIB = 1024


def warn_damaged(r: Repository) -> None:
    """Damaged point documents are skipped, never silently: one warning line each."""
    for msg in r.damaged:
        print(f"comb: warning: skipping {msg}", file=sys.stderr)


def cmd_init(repo: str, args: argparse.Namespace) -> int:
    parity = (
        ParityGeometry()
        if args.parity_overhead is None
        else ParityGeometry.from_overhead(args.parity_overhead)
    )
    r = Repository.init(
        repo,
        args.chunk_size or DEFAULT_CHUNK_SIZE_BYTES,
        args.zstd_level,
        parity,
        encryption=args.encryption,
    )
    g = r.config.parity
    how = f"encrypted, {r.config.encryption['algorithm']}" if r.config.encryption else "unencrypted"
    print(
        f"created repository {r.location} (id {r.config.id[:16]}, chunk size "
        f"{r.config.chunk_size}, zstd level {r.config.zstd_level}, {how}, "
        + (
            f"parity {g.data_shards}+{g.parity_shards} shards of {g.shard_bytes // 1024} KiB, "
            f"{g.overhead * 100:g} %)"
            if g
            else "no parity)"
        )
    )
    return 0


def point_summary(p: RecoveryPoint) -> dict[str, Any]:
    return {
        "id": p.id,
        "source": p.source,
        "source_path": p.source_path,
        "time": p.time,
        "size": p.size,
        "mode": p.mode,
        "parent": p.parent,
        "engine": p.engine,
        **asdict(p.stats),
    }


def cmd_backup(repo: str, args: argparse.Namespace) -> int:
    r = Repository.open(repo)
    if not 1 <= args.batch_mib <= MAX_BATCH_MIB:
        raise UsageError(f"--batch-mib must be between 1 and {MAX_BATCH_MIB}")
    if args.source_name is not None and not args.source_name.strip():
        raise UsageError("--source-name must not be empty")
    if args.workers is not None and args.workers < 1:
        raise UsageError("--workers must be at least 1")
    opts = BackupOptions(
        source_name=args.source_name,
        changed_extents=args.changed_extents,
        batch_bytes=args.batch_mib * 1024 * 1024,
    )
    vopts = _vsphere_options(args)
    engine = make_engine(args.engine, args.ray_address, args.workers)
    t0 = time.perf_counter()
    with progress_bar(f"backup {os.path.basename(args.source)}", not args.json) as bar:
        if vopts is not None:
            points = run_vsphere_backup(r, args.source, engine, opts, vopts, bar)
        else:
            points = [run_backup(r, args.source, engine, opts, bar)]
    seconds = time.perf_counter() - t0
    for point in points:
        _report_backup(point, engine, seconds, args.json)
    return 0


def _vsphere_options(args: argparse.Namespace) -> VsphereOptions | None:
    """The vSphere options, or None (and none of them given) for other sources."""
    if not is_vsphere(args.source):
        given = [
            flag
            for flag, value in (
                ("--quiesce", args.quiesce),
                ("--disk", args.disk),
                ("--all-disks", args.all_disks),
                ("--cbt-audit", args.cbt_audit is not None),
                ("--insecure", args.insecure),
                ("--ca-file", args.ca_file),
            )
            if value
        ]
        if given:
            raise UsageError(f"{given[0]} applies to vsphere:// sources only")
        return None
    if args.insecure and args.ca_file:
        raise UsageError("give --insecure or --ca-file, not both")
    return VsphereOptions(
        quiesce=args.quiesce,
        disks=tuple(args.disk),
        all_disks=args.all_disks,
        cbt_audit=DEFAULT_AUDIT_PERCENT if args.cbt_audit is None else args.cbt_audit,
        verify=False if args.insecure else (args.ca_file or True),
    )


def _report_backup(point: RecoveryPoint, engine: Engine, seconds: float, as_json: bool) -> None:
    st = point.stats
    if as_json:  # one line per point (JSON Lines): a VM backup makes one point per disk
        print(
            json.dumps(
                {
                    "id": point.id,
                    "source": point.source,
                    "parent": point.parent,
                    "mode": point.mode,
                    "size": point.size,
                    "bytes_read": st.bytes_read,
                    "bytes_new": st.bytes_new,
                    "bytes_stored": st.bytes_stored,
                    "metadata_bytes": st.metadata_bytes,
                    "engine": point.engine,
                    "engine_startup_seconds": round(engine.startup_s, 3),
                    "seconds": round(seconds, 3),
                    **(
                        {"change_id": point.change_id, "cbt": point.vsphere.get("cbt")}
                        if point.vsphere is not None
                        else {}
                    ),
                },
                sort_keys=True,
                default=str,
            )
        )
    else:
        rate = st.bytes_read / seconds / 1e6 if seconds else 0.0
        startup = f", engine start-up {engine.startup_s:.1f} s" if engine.startup_s >= 0.5 else ""
        print(
            f"recovery point {point.id} of {point.source} ({point.mode}): "
            f"read {human_bytes(st.bytes_read)}, new {human_bytes(st.bytes_new)}, "
            f"stored {human_bytes(st.bytes_stored)} "
            f"in {seconds:.1f} s ({rate:.0f} MB/s read, {point.engine} engine{startup})"
        )


def cmd_points(repo: str, args: argparse.Namespace) -> int:
    r = Repository.open(repo)
    points = [p for p in r.points() if args.source is None or p.source == args.source]
    warn_damaged(r)
    if args.json:
        _json({"points": [point_summary(p) for p in points]})
        return 0
    if not points:
        print("no recovery points")
        return 0
    rows = [
        (
            p.id,
            p.time[:19].replace("T", " "),
            p.mode,
            human_bytes(p.size),
            human_bytes(p.stats.bytes_read),
            human_bytes(p.stats.bytes_new),
            human_bytes(p.stats.bytes_stored),
            p.source,
            p.source_path,
        )
        for p in points
    ]
    head = ("ID", "TIME (UTC)", "MODE", "SIZE", "READ", "NEW", "STORED", "SOURCE", "FROM")
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]
    for row in (head, *rows):
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
    return 0


def cmd_restore(repo: str, args: argparse.Namespace) -> int:
    r = Repository.open(repo)
    t0 = time.perf_counter()
    with reader_lock(r, "restore"):  # before resolving: a forget and prune cannot slip between
        try:
            point = r.resolve(args.point)
        finally:
            warn_damaged(r)
        with progress_bar(f"restore {point.id[:8]}", not args.json) as bar:
            written = restore_point(r, point, args.output, force=args.force, progress=bar)
    seconds = time.perf_counter() - t0
    if args.json:
        _json(
            {
                "id": point.id,
                "output": args.output,
                "size": point.size,
                "bytes_written": written,
                "seconds": round(seconds, 3),
            }
        )
    else:
        rate = point.size / seconds / 1e6 if seconds else 0.0
        print(
            f"restored {point.id} ({human_bytes(point.size)}, {human_bytes(written)} of data) "
            f"to {args.output} in {seconds:.1f} s ({rate:.0f} MB/s)"
        )
    return 0


def cmd_verify(repo: str, args: argparse.Namespace) -> int:
    r = Repository.open(repo)
    with reader_lock(r, "verify"), progress_bar("verify", not args.json) as bar:
        report = check_repository(r.storage, read_data=args.read_data, progress=bar)
        ids = {p.id for p in r.points()}
        for name in overlay.names(r):
            errors, warnings = overlay.check(r, name, ids)
            report.errors += errors
            report.warnings += warnings
    if args.json:
        _json({"ok": report.ok, "read_data": args.read_data, **asdict(report)})
    else:
        for w in report.warnings:
            print(f"warning: {w}", file=sys.stderr)
        for e in report.errors:
            print(f"error: {e}", file=sys.stderr)
        print(summary(report))
    if not report.ok:
        if args.json:
            return CorruptionError.exit_code
        raise CorruptionError(
            f"verify found {len(report.errors)} error(s); first: {report.errors[0]}"
        )
    return 0


def print_table(head: list[str], rows: list[list[str]]) -> None:
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(head)]
    print("  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)).rstrip())
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
