"""Garbage collection: what no recovery point needs (FORMAT.md 13), as marks, a plan and its
removal in a crash-safe order. ``catalog.maint.prune`` runs them under the prune protocol.

``mark`` reads every given point's root and the leaves it references: the live metadata files
and the ids of every live chunk. ``plan`` lists what no marked point needs: packs none of whose
chunks is live (and packs no index segment lists: orphans of killed backups), leaves, roots and
change tables no point names, file catalog files no catalog names, parity of no pack,
temporary files of dead writers. ``execute`` removes a plan: a segment that lists removed and
kept packs is rewritten with the kept rows (the new segment is durable before the old one
goes); then old segments, packs, parity, manifests, temporary files. A crash at any step
leaves a superset of what the points need; the next prune finishes.

Owns marking, planning and removing. Must not: take locks or decide when removing is safe
(``catalog.maint.prune``). Overlays need their base points, which ``forget`` never removes (so
a plan keeps them too).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from catalog.maint.repack import Repacked, repack_live
from catalog.repo import Repository
from catalog.store import filecat
from catalog.store.blocks import BLOCKS_SUFFIX, block_list_name, parquet_of
from catalog.store.changes import changes_name
from catalog.store.index import (
    INDEX_PREFIX,
    INDEX_SCHEMA,
    IndexSegmentWriter,
    contains,
    id_keys,
    ids_to_array,
    segment_names,
)
from catalog.store.leaves import LEAVES_PREFIX, leaves_name
from catalog.store.locks import process_gone, read_locks
from catalog.store.manifest import ROOTS_PREFIX, roots_name
from catalog.store.parity import PARITY_PREFIX, parity_name
from catalog.store.parquet_io import read_parquet
from catalog.store.points import RecoveryPoint, forgotten_name, load_forgotten, point_name
from catalog.store.storage import TMP_DIR, Storage

CHANGES_DIR = "manifests/changes"
TMP_MAX_AGE_S = 24 * 3600.0


@dataclass
class Marks:
    """What the marked points need."""

    points: set[str] = field(default_factory=set)
    files: set[str] = field(default_factory=set)
    ids: list[np.ndarray] = field(default_factory=list)  # 'S32' arrays, merged on demand

    def live_ids(self) -> np.ndarray:
        if not self.ids:
            return np.empty(0, "S32")
        merged = np.unique(np.concatenate(self.ids))
        self.ids = [merged]
        return merged


def mark(repo: Repository, points: list[RecoveryPoint], marks: Marks) -> None:
    """Add what ``points`` need (points already in ``marks`` are skipped)."""
    todo = [p for p in points if p.id not in marks.points]
    leaves: dict[str, set[int]] = {}
    for p in todo:
        marks.points.add(p.id)
        marks.files.add(point_name(p.id))
        marks.files.add(roots_name(p.root))
        if p.changes:
            marks.files.add(changes_name(p.changes))
        m = repo.manifest(p)
        for file_id, ordinal in zip(m.leaf_files, m.leaf_ordinals.tolist(), strict=True):
            leaves.setdefault(file_id, set()).add(ordinal)
    for file_id, ordinals in leaves.items():
        name = leaves_name(file_id)
        marks.files.add(name)
        table = read_parquet(repo.storage, name, ["leaf", "chunk_id"])
        keep = pc.is_in(table.column("leaf"), value_set=pa.array(sorted(ordinals), pa.int32()))
        ids = ids_to_array(table.filter(keep).column("chunk_id"))
        if len(ids):
            marks.ids.append(np.unique(id_keys(ids)))


def mark_forgotten(repo: Repository, marks: Marks) -> None:
    """Keep the change tables of forgotten points (and their documents, which are never
    removed): analytics follow each source's chain through them (FORMAT.md 9.1). Called after
    ``mark`` of the live points, so a point forgotten meanwhile is seen in one or the other."""
    gone, _damaged = load_forgotten(repo.storage, [])
    for p in gone:
        marks.files.add(forgotten_name(p.id))
        if p.changes:
            marks.files.add(changes_name(p.changes))


@dataclass
class Plan:
    """What a prune removes (and rewrites), with sizes."""

    packs: list[str] = field(default_factory=list)  # storage names
    pack_bytes: int = 0
    orphans: set[str] = field(default_factory=set)  # packs no segment lists
    segments_removed: list[str] = field(default_factory=list)
    segments_rewritten: list[str] = field(default_factory=list)
    kept_rows: pa.Table | None = None  # the rows the rewritten segments keep
    files: list[str] = field(default_factory=list)  # manifests and change tables
    file_bytes: int = 0
    tmp: list[str] = field(default_factory=list)
    held: list[str] = field(default_factory=list)  # garbage Object Lock keeps for now
    live_packs: int = 0
    live: list[str] = field(default_factory=list)  # the packs kept (storage names)
    # Parity files of no present pack (a crash between parity and pack commit, or during a
    # prune); the parity of every removed pack goes with it (``execute``).
    parity: list[str] = field(default_factory=list)

    sizes: dict[str, int] = field(default_factory=dict)  # of every pack and file removed

    @property
    def bytes(self) -> int:
        return self.pack_bytes + self.file_bytes

    @property
    def orphan_packs(self) -> int:
        return len(self.orphans)

    def add(self, into: list[str], name: str, size: int) -> None:
        into.append(name)
        self.sizes[name] = size
        if into is self.packs:
            self.pack_bytes += size
        else:
            self.file_bytes += size


def pack_id(name: str) -> str:
    return name.rsplit("/", 1)[-1][: -len(".pack")]


def plan(
    repo: Repository,
    marks: Marks,
    retired: frozenset[str] = frozenset(),
    assume_copied: bool = False,
) -> Plan:
    """Everything no marked point needs (what of it may go now: ``catalog.maint.prune``).

    ``retired`` packs (repacked: their live chunks have copies elsewhere) go too, unless one
    holds a live chunk with no copy outside them (e.g. one a backup deduplicated against
    after the repack)."""
    storage = repo.storage
    out = Plan()
    live = marks.live_ids()
    present = {pack_id(n): n for n in storage.list("packs") if n.endswith(".pack")}
    segments = segment_names(storage)
    tables = {s: read_parquet(storage, s, ["chunk_id", "pack"]) for s in segments}
    cols = [
        (
            t.column("pack").to_numpy(zero_copy_only=False),
            id_keys(ids_to_array(t.column("chunk_id"))),
        )
        for t in tables.values()
        if t.num_rows
    ]
    packs = np.concatenate([c[0] for c in cols]) if cols else np.empty(0, object)
    keys = np.concatenate([c[1] for c in cols]) if cols else np.empty(0, "S32")
    hit = contains(live, keys)
    usable = np.array([p in present and p not in retired for p in packs.tolist()], bool)
    covered = np.unique(keys[hit & usable])
    stranded = hit & ~usable & ~contains(covered, keys)  # live, and only in retired packs
    if assume_copied:  # a dry run: as if the repack had copied them
        stranded &= np.array([p not in retired for p in packs.tolist()], bool)
    indexed = set(packs.tolist())
    live_packs = set(packs[hit & usable].tolist()) | set(packs[stranded].tolist())
    for pid, name in sorted(present.items()):
        if pid not in live_packs:
            out.add(out.packs, name, storage.size(name))
            if pid not in indexed:
                out.orphans.add(name)
    out.live = sorted(present[pid] for pid in live_packs & set(present))
    out.live_packs = len(out.live)
    for name in storage.list(PARITY_PREFIX):
        if name.endswith(".parity") and name.rsplit("/", 1)[-1][:-7] not in present:
            out.parity.append(name)
    drop_segments(repo, {pack_id(n) for n in out.packs}, out, tables)
    for prefix in (LEAVES_PREFIX, ROOTS_PREFIX, CHANGES_DIR):
        for name in storage.list(prefix):
            if name.endswith(".parquet") and name not in marks.files:
                out.add(out.files, name, storage.size(name))
    # Catalog files no catalog names (an index killed before its document), unless a document
    # does not read: the files it names are not known then (verify says which).
    catalogs = filecat.survey(storage)
    for name in storage.list(filecat.FILES_PREFIX) if not catalogs.unread else []:
        if name.endswith(".parquet") and name not in catalogs.named:
            out.add(out.files, name, storage.size(name))
    for prefix in (LEAVES_PREFIX, INDEX_PREFIX):  # a block list whose file is gone (a crash)
        for name in storage.list(prefix):
            if name.endswith(BLOCKS_SUFFIX) and not storage.exists(parquet_of(name)):
                out.add(out.files, name, storage.size(name))
    out.tmp = dead_temporary(storage)
    return out


def dead_temporary(storage: Storage) -> list[str]:
    """Temporary files no writer will commit: their writer, a process of this host named by
    the pid that starts the file's name, is gone (or the pid is a newer process's); or they
    are older than ``TMP_MAX_AGE_S``. While a live lock of another host could own a file, only
    age counts (its pid means nothing here)."""
    now, host = time.time(), socket.gethostname()
    foreign = any(lk.host != host and lk.stale() is None for lk in read_locks(storage))
    out = []
    for entry in storage.tmp_files():
        written = storage.mtime(f"{TMP_DIR}/{entry}")  # None: committed or aborted meanwhile
        if written is None:
            continue
        pid = entry.split("-", 1)[0]
        dead = not foreign and pid.isdigit() and process_gone(int(pid), written) is not None
        if dead or now - written > TMP_MAX_AGE_S:
            out.append(f"{TMP_DIR}/{entry}")
    return out


def remove_dead_temporary(storage: Storage) -> int:
    """Remove what ``dead_temporary`` finds (a backup's start does; prune too); how many."""
    dead = dead_temporary(storage)
    for name in dead:
        storage.remove(name)
    return len(dead)


def drop_segments(
    repo: Repository, gone: set[str], out: Plan, tables: dict[str, pa.Table] | None = None
) -> None:
    """Fill ``out`` with the segments that list packs in ``gone``: removed when they list only
    those, rewritten (their other rows kept) otherwise. ``tables``: the segments' pack columns
    when already read."""
    storage = repo.storage
    if tables is None:
        tables = {s: read_parquet(storage, s, ["pack"]) for s in segment_names(storage)}
    value_set = pa.array(sorted(gone), pa.string())
    kept_parts = []
    for seg, t in tables.items():
        in_gone = pc.is_in(t.column("pack"), value_set=value_set)
        n_gone = pc.sum(in_gone).as_py() or 0
        if n_gone == 0:
            continue
        if n_gone == t.num_rows:
            out.segments_removed.append(seg)
        else:
            out.segments_rewritten.append(seg)
            full = read_parquet(storage, seg, INDEX_SCHEMA.names)
            kept_parts.append(full.filter(pc.invert(in_gone)))
    if kept_parts:
        out.kept_rows = pa.concat_tables(kept_parts)


def repack(repo: Repository, marks: Marks) -> Repacked:
    """Copy the live chunks of mostly-garbage packs into new packs (``catalog.maint.repack``)."""
    return repack_live(repo, marks.live_ids())


CHECK_EVERY = 64  # removals between two looks at the prune lock's file (``execute``)


def execute(repo: Repository, p: Plan, check: Callable[[bool], None] = lambda _look: None) -> None:
    """Remove in the crash-safe order (module docstring); ``check(look)`` (the lock still
    held) before every removal, looking at the lock's file (a request on object storage) before
    the first and every ``CHECK_EVERY`` removals: a prune must not go on once its lock is lost."""
    storage = repo.storage
    done = 0

    def remove(name: str) -> None:
        nonlocal done
        check(done % CHECK_EVERY == 0)
        storage.remove(name)
        done += 1

    if p.kept_rows is not None and p.kept_rows.num_rows:
        seg = IndexSegmentWriter(storage)
        seg.add(p.kept_rows)
        seg.commit()  # durable before any segment it replaces goes
    # Segments before packs: a crash in between leaves packs no segment lists (a warning for
    # verify, orphans for the next prune), never a segment naming a missing pack (an error).
    for name in _with_block_lists(p.segments_removed + p.segments_rewritten):
        remove(name)
    for name in p.packs:
        remove(name)
    # Parity after its pack: a crash in between leaves parity without a pack (removed by the
    # next prune), never a pack whose parity is gone.
    for name in [parity_name(pack_id(n)) for n in p.packs] + p.parity:
        remove(name)
    for name in _with_block_lists(p.files) + p.tmp:
        remove(name)
    dirs = ("packs", PARITY_PREFIX, "index", LEAVES_PREFIX, ROOTS_PREFIX, CHANGES_DIR)
    for d in (*dirs, filecat.FILES_PREFIX):
        storage.sync(d)


def _with_block_lists(names: list[str]) -> list[str]:
    """Each file followed by its block list (``catalog.store.blocks``), which goes after it: a
    crash in between leaves a block list without its file, removed by the next prune."""
    out = []
    for name in names:
        out.append(name)
        if name.endswith(".parquet") and name.startswith((LEAVES_PREFIX, INDEX_PREFIX)):
            out.append(block_list_name(name))
    return out
