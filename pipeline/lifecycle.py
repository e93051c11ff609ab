"""``forget``, ``prune``, ``repair index``, ``locks`` and ``unlock``: the lifecycle commands."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, replace

import drive.overlays.overlay as overlay
from catalog.errors import CorruptionError, RepositoryError, UsageError
from catalog.maint.gc import prune
from catalog.maint.repair import repair_index
from catalog.maint.retention import KeepPolicy, forget_mask
from catalog.maint.scrub import ScrubReport, scrub
from catalog.repo import Repository
from catalog.store.format import CONFIG_NAME
from catalog.store.locks import Lock, LockInfo, acquire, read_locks, remove_stale
from catalog.store.points import RecoveryPoint, retire_point

from .output import human_bytes
from .progress import progress_bar

LOCKING_FEATURE = "locks"


def ensure_locking(repo: Repository) -> None:
    """Mark the repository as one whose writers take locks (``ro_compat``: a comb that does not
    know locking may still read it, but no longer write to it). Set before anything is removed."""
    feats = repo.config.features
    if LOCKING_FEATURE in feats.ro_compat:
        return
    new = replace(feats, ro_compat=tuple(sorted({*feats.ro_compat, LOCKING_FEATURE})))
    repo.config = replace(repo.config, features=new)
    repo.storage.write_atomic(CONFIG_NAME, repo.config.to_json())


def _waiting(blocker: object) -> None:
    if isinstance(blocker, LockInfo):
        print(f"comb: waiting for the lock of {blocker.describe()}", file=sys.stderr)


@contextmanager
def writer_lock(repo: Repository, kind: str) -> Iterator[Lock]:
    """The shared lock of a backup (or forget): waits while a prune removes data."""
    # Lock files are plain: in an encrypted repository they name the command, not its source.
    command = kind if repo.keys is not None else " ".join(sys.argv[1:3])
    lock = acquire(repo.storage, kind, command=command, on_wait=_waiting)
    try:
        yield lock
    finally:
        lock.release()


@contextmanager
def reader_lock(repo: Repository, kind: str, long_lived: bool = False) -> Iterator[None]:
    """A shared lock for readers (restore, verify, scrub, export, serve, mount, boot), held
    until they exit, so prune does not remove files under them; a repository on read-only media
    cannot take one and is read without it. A reader that ends (restore, verify, scrub, export)
    takes none in a repository no forget or prune ever ran on (no ``locks`` feature), so that it
    writes nothing there (FORMAT.md 12); the one gap: such a reader still running when the first
    prune removes data fails on a missing file (never returns wrong data).

    ``long_lived`` readers (serve, mount, boot) always lock: one started before the first
    forget and prune would otherwise stay unprotected for days, as that prune sets the feature
    and then sees no lock of theirs (FORMAT.md 13). They say so when they cannot lock."""
    if not long_lived and LOCKING_FEATURE not in repo.config.features.ro_compat:
        yield
        return
    try:
        lock = acquire(repo.storage, kind, command=kind, on_wait=_waiting)
    except RepositoryError as err:
        if long_lived:
            print(
                f"comb: note: {kind} holds no lock ({err.message}): a prune meanwhile may "
                "remove data it reads",
                file=sys.stderr,
            )
        yield
        return
    try:
        yield
    finally:
        lock.release()


def overlay_bases(repo: Repository) -> dict[str, list[str]]:
    """Point id -> names of the overlays over it."""
    out: dict[str, list[str]] = {}
    for name in overlay.names(repo):
        base = str(overlay.read_doc(repo, name)["base"])
        out.setdefault(base, []).append(name)
    return out


def _policy(args: argparse.Namespace) -> KeepPolicy:
    values = {}
    for rule in ("last", "hourly", "daily", "weekly", "monthly", "yearly"):
        n = getattr(args, f"keep_{rule}")
        if n is not None and n < 0:
            raise UsageError(f"--keep-{rule} must be 0 or more")
        values[rule] = n or 0
    return KeepPolicy(**values)


def cmd_forget(repo: str, args: argparse.Namespace) -> int:
    r = Repository.open(repo)
    r.require_writable()
    policy = _policy(args)
    if not policy.any() and not args.point:
        raise UsageError("give --keep-* rules and/or point ids to forget (nothing would go)")
    with writer_lock(r, "forget"):
        points = r.points()
        if r.damaged:
            raise RepositoryError(
                f"{len(r.damaged)} damaged point document(s) (`comb verify` lists them): "
                "forget decides per source and will not guess around them"
            )
        if args.source is not None and all(p.source != args.source for p in points):
            raise UsageError(f"no recovery point of source {args.source!r}")
        mask = forget_mask(points, policy, tuple(args.point), args.source)
        bases = overlay_bases(r)
        gone: list[RecoveryPoint] = []
        held: list[tuple[RecoveryPoint, list[str]]] = []
        for p, drop in zip(points, mask.tolist(), strict=True):
            if drop and p.id in bases:
                held.append((p, bases[p.id]))
            elif drop:
                gone.append(p)
        if not args.dry_run and gone:
            ensure_locking(r)
            for p in gone:
                retire_point(r.storage, p.id)
            path = r.storage.local_path("points")
            if path is not None:
                r.storage.sync_dir(path)  # type: ignore[attr-defined]
    kept = len(points) - len(gone)
    if args.json:
        print(
            json.dumps(
                {
                    "dry_run": args.dry_run,
                    "forgotten": [p.id for p in gone],
                    "kept": kept,
                    "held_by_overlays": {p.id: names for p, names in held},
                },
                sort_keys=True,
            )
        )
        return 0
    verb = "would forget" if args.dry_run else "forgot"
    for p in gone:
        print(f"{verb} {p.id}  {p.time}  {p.source}")
    for p, names in held:
        print(f"kept {p.id}  {p.time}  {p.source}  (base of overlay {', '.join(names)})")
    print(
        f"{verb} {len(gone)} recovery point(s), kept {kept}"
        + ("; run `comb prune` to free their data" if gone and not args.dry_run else "")
    )
    return 0


def cmd_prune(repo: str, args: argparse.Namespace) -> int:
    r = Repository.open(repo)
    r.require_writable()
    r.points()
    if r.damaged:
        raise RepositoryError(
            f"{len(r.damaged)} damaged point document(s) (`comb verify` lists them): prune "
            "cannot tell what they need, so it removes nothing"
        )
    if not args.dry_run:
        ensure_locking(r)
    res = prune(r, dry_run=args.dry_run, on_wait=_waiting)
    p = res.plan
    if args.json:
        doc = {
            "dry_run": res.dry_run,
            "points": res.points,
            "packs_removed": len(p.packs),
            "orphan_packs": p.orphan_packs,
            "packs_kept": p.live_packs,
            "pack_bytes": p.pack_bytes,
            "metadata_files_removed": len(p.files),
            "metadata_bytes": p.file_bytes,
            "segments_removed": len(p.segments_removed),
            "segments_rewritten": len(p.segments_rewritten),
            "tmp_files_removed": len(p.tmp),
            "exclusive_seconds": round(res.exclusive_s, 3),
            "packs_repacked": len(res.repacked.retired),
            "chunks_copied": res.repacked.chunks,
            "bytes_copied": res.repacked.bytes,
            "damaged": res.repacked.damaged,
        }
        print(json.dumps(doc, sort_keys=True))
        return 0
    verb = "would remove" if res.dry_run else "removed"
    for msg in res.repacked.damaged:
        print(f"comb: warning: not repacked: {msg} (`comb verify --read-data`)", file=sys.stderr)
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
        + ("" if res.dry_run else f"; exclusive phase {res.exclusive_s:.2f} s")
    )
    return 0


def cmd_locks(repo: str, args: argparse.Namespace) -> int:
    r = Repository.open(repo)
    locks = read_locks(r.storage)
    if args.json:
        print(
            json.dumps(
                [{**asdict(lk), "stale": lk.stale()} for lk in locks], sort_keys=True, indent=2
            )
        )
        return 0
    for lk in locks:
        why = lk.stale()
        state = f"STALE ({why})" if why else f"alive, heartbeat {lk.heartbeat}"
        print(f"{lk.id}  {lk.describe()}  {state}")
    if not locks:
        print("no locks")
    return 0


def cmd_unlock(repo: str, args: argparse.Namespace) -> int:
    if not args.stale:
        raise UsageError("unlock removes stale locks only: give --stale")
    r = Repository.open(repo)
    removed = remove_stale(r.storage)
    for lk, why in removed:
        print(f"removed {lk.id}  {lk.describe()}  ({why})")
    live = len(read_locks(r.storage))
    print(f"removed {len(removed)} stale lock(s); {live} live lock(s) left")
    return 0


def cmd_repair(repo: str, args: argparse.Namespace) -> int:
    r = Repository.open(repo)
    ensure_locking(r)
    res = repair_index(r, on_wait=_waiting)
    for msg in res.unreadable:
        print(f"comb: warning: left out: {msg}", file=sys.stderr)
    print(
        f"rebuilt the index from {res.packs} pack(s) ({res.chunks} chunk(s)); "
        f"replaced {res.old_segments} segment(s)"
    )
    if res.unreadable:
        raise CorruptionError(
            f"{len(res.unreadable)} pack(s) unreadable and left out of the index; points that "
            "need their chunks cannot be restored until a backup stores the data again"
        )
    return 0


def cmd_scrub(repo: str, args: argparse.Namespace) -> int:
    if not 0 < args.sample <= 100:
        raise UsageError("--sample must be a percentage above 0 and at most 100")
    r = Repository.open(repo)
    if args.repair:
        r.require_writable()
        ensure_locking(r)
    with reader_lock(r, "scrub"), progress_bar("scrub", not args.json) as bar:
        rep = scrub(r, args.sample, args.repair, progress=bar)
    if args.json:
        _scrub_json(rep)
    else:
        _scrub_text(rep)
    _scrub_verdict(rep)
    return 0


def _scrub_json(rep: ScrubReport) -> None:
    doc = {
        "packs": rep.packs,
        "packs_total": rep.packs_total,
        "bytes": rep.bytes,
        "seconds": round(rep.seconds, 3),
        "damaged": [
            {
                "pack": d.pack,
                "offset": d.offset,
                "chunk_id": d.chunk_id.hex(),
                "why": d.why,
                "healable": d.healable,
            }
            for d in rep.damaged
        ],
        "affected": [asdict(a) for a in rep.affected],
        "quarantined": rep.quarantined,
        "copied_chunks": rep.copied_chunks,
        "parity": rep.parity,
        "parity_problems": rep.parity_problems,
        "healed": [
            {"pack": h.pack, "action": h.action, "shards": h.shards, "why": h.why}
            for h in rep.healed
        ],
        "unhealed": len(rep.remaining),
    }
    print(json.dumps(doc, sort_keys=True))


def _scrub_text(rep: ScrubReport) -> None:
    for d in rep.damaged:
        tag = " (healable from parity)" if d.healable and not rep.repaired else ""
        print(f"damaged: {d.why}{tag}", file=sys.stderr)
    for _pid, why in sorted(rep.parity_problems.items()):
        print(f"parity: {why}", file=sys.stderr)
    for h in rep.healed:
        if h.action == "rebuilt from parity":
            print(f"healed: pack {h.pack[:16]} rebuilt from parity ({h.shards} shard(s))")
        elif h.action == "parity rewritten":
            print(f"healed: parity of pack {h.pack[:16]} rewritten from the intact pack")
        elif h.action == "not healable":
            print(f"not healed: pack {h.pack[:16]}: {h.why}", file=sys.stderr)
    for a in rep.affected:
        spans = ", ".join(f"{o}+{n}" for o, n in a.extents[:8])
        more = f" and {len(a.extents) - 8} more" if len(a.extents) > 8 else ""
        print(f"affected: point {a.point} of {a.source}: extents {spans}{more}", file=sys.stderr)
    state = "clean"
    if rep.damaged:
        state = f"{len(rep.damaged)} damaged chunk(s)"
    if rep.parity_problems:
        state += f", {len(rep.parity_problems)} pack(s) with missing or damaged parity"
    print(
        f"scrubbed {rep.packs} of {rep.packs_total} pack(s), {human_bytes(rep.bytes)} in "
        f"{rep.seconds:.1f} s ({rep.mb_s:.0f} MB/s): {state}"
    )
    if rep.quarantined:
        print(
            f"repaired: {rep.copied_chunks} intact chunk(s) of {len(rep.quarantined)} damaged "
            "pack(s) copied, the damaged pack(s) removed"
        )


def _scrub_verdict(rep: ScrubReport) -> None:
    """The exit: an error while anything is damaged or unprotected when scrub ends."""
    if rep.repaired:
        left = rep.remaining
        if left:
            packs = len({d.pack for d in left})
            raise CorruptionError(
                f"{len(left)} damaged chunk(s) in {packs} pack(s) beyond parity, "
                f"{len(rep.affected)} recovery point(s) affected; isolated; they heal when a "
                "backup reads the same data again"
            )
        return
    if rep.damaged:
        healable = sum(d.healable for d in rep.damaged)
        hint = (
            "`comb scrub --repair` heals them from parity"
            if healable == len(rep.damaged)
            else "`comb scrub --repair` heals what parity covers and isolates the rest so that "
            "a later backup heals it"
        )
        raise CorruptionError(
            f"{len(rep.damaged)} damaged chunk(s) in {len(rep.bad_packs)} pack(s), "
            f"{len(rep.affected)} recovery point(s) affected"
            + (f", {healable} healable from parity" if rep.parity else "")
            + f"; {hint}"
        )
    if rep.parity_problems:
        raise CorruptionError(
            f"{len(rep.parity_problems)} pack(s) with missing or damaged parity; "
            "`comb scrub --repair` writes it again"
        )
