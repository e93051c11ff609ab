"""``comb prune``: remove the data no recovery point needs (``catalog.maint.gc``)."""

from __future__ import annotations

import argparse
from typing import Any

from catalog.errors import RepositoryError
from catalog.maint.prune import PruneResult, prune
from catalog.repo import Repository
from catalog.store import s3_lock

from ..console import human_bytes, note, print_json, waiting, warn
from ..locking import ensure_locking
from . import Subparsers, command


def add_parser(sub: Subparsers) -> None:
    s = command(
        sub,
        "prune",
        "remove data no recovery point needs (and repack mostly unused packs)",
        ["comb -r /backup/repo prune --dry-run", "comb -r /backup/repo prune --json"],
        json="print what was (or would be) removed as one JSON object",
    )
    s.add_argument("--dry-run", action="store_true", help="show what would go, remove nothing")
    s.set_defaults(run=cmd_prune)


def cmd_prune(repo: str, args: argparse.Namespace) -> int:
    r = Repository.open(repo, password=args.password)
    r.require_writable()
    res = run_prune(r, args.dry_run)
    if args.json:
        print_json(prune_doc(res))
    else:
        print_prune(res)
    return 0


def run_prune(r: Repository, dry_run: bool) -> PruneResult:
    """Prune ``r`` (also ``forget --prune``'s second step)."""
    r.points()
    if r.damaged:
        raise RepositoryError(
            f"{len(r.damaged)} damaged point document(s) (`comb verify` lists them): prune "
            "cannot tell what they need, so it removes nothing"
        )
    if not dry_run:
        ensure_locking(r)
    result = prune(r, dry_run=dry_run, on_wait=waiting)
    kept = s3_lock.versions_kept(r.storage) if result.plan.bytes else None
    if kept:
        note(kept)
    return result


def prune_doc(res: PruneResult) -> dict[str, Any]:
    """What ``prune --json`` prints (and ``forget --prune --json`` as its ``prune``)."""
    p = res.plan
    return {
        "dry_run": res.dry_run,
        "points_kept": res.points,
        "packs_removed": len(p.packs),
        "orphan_packs": p.orphan_packs,
        "packs_kept": p.live_packs,
        "pack_bytes_removed": p.pack_bytes,
        "metadata_files_removed": len(p.files),
        "metadata_bytes_removed": p.file_bytes,
        "segments_removed": len(p.segments_removed),
        "segments_rewritten": len(p.segments_rewritten),
        "tmp_files_removed": len(p.tmp),
        "exclusive_seconds": round(res.exclusive_s, 3),
        "removing_seconds": round(res.removing_s, 3),
        "held_by_object_lock": len(p.held),
        "retention_extended": res.extended,
        "packs_repacked": len(res.repacked.retired),
        "chunks_copied": res.repacked.chunks,
        "bytes_copied": res.repacked.bytes,
        "damaged": res.repacked.damaged,
    }


def print_prune(res: PruneResult) -> None:
    """What ``prune`` prints (and ``forget --prune`` after forget's lines)."""
    p = res.plan
    verb = "would remove" if res.dry_run else "removed"
    for msg in res.repacked.damaged:
        warn(f"not repacked: {msg} (`comb verify --read-data`)")
    if res.repacked.retired:
        rp = res.repacked
        print(
            f"repack{'' if res.dry_run else 'ed'} {len(rp.retired)} mostly unused pack(s)"
            + ("" if res.dry_run else f": {rp.chunks} chunk(s), {human_bytes(rp.bytes)} copied")
        )
    print(
        f"{verb} {len(p.packs)} pack(s) ({human_bytes(p.pack_bytes)}"
        + (f", {p.orphan_packs} left by interrupted backups" if p.orphan_packs else "")
        + f") and {len(p.files)} metadata file(s) ({human_bytes(p.file_bytes)}); "
        f"{p.live_packs} pack(s) hold the {res.points} recovery point(s)"
        + (
            f"; index: {len(p.segments_removed)} segment(s) removed, "
            f"{len(p.segments_rewritten)} rewritten"
            if p.segments_removed or p.segments_rewritten
            else ""
        )
        + (
            ""
            if res.dry_run
            else f"; under the prune lock {res.exclusive_s:.2f} s (removing {res.removing_s:.2f} s)"
        )
    )
    if p.held or res.extended:
        print(
            f"Object Lock: kept {len(p.held)} unused file(s) until their retention ends; "
            f"extended the retention of {res.extended} file(s) live points use"
        )
