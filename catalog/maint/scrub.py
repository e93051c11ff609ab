"""``comb scrub``: read every pack (or a sample), find each damaged chunk, say which recovery
points and disk extents it hurts, and with ``--repair`` heal it from parity or, beyond parity,
isolate it so a later backup heals it.

A pack is named by the BLAKE3 of its bytes, so one hash of the whole file checks every byte of
it (fast: BLAKE3 runs at several GB/s and releases the GIL, so packs are checked on threads).
Only a pack whose hash does not match is looked into: each of its chunks is decompressed and
checked against its id, which finds exactly the damaged chunks.

In a repository with parity (FORMAT.md 15) each pack's parity file is checked too (its
metadata hash and the hash of every parity shard), and a damaged pack is rebuilt in memory to
see whether parity heals it. ``--repair`` then, under the exclusive lock (catalog.maint.heal):
replaces a healable pack by its original bytes, and writes parity that is missing or damaged.

Beyond parity (or without it): under the exclusive lock, the pack's intact chunks (as far as
parity rebuilt them) are copied into a new pack (each checked on the way) and indexed, and the
damaged pack is removed. Its damaged chunks are then missing rather than wrong; the next backup
that reads the same data stores them again (the dedup index knows only chunks whose pack
exists), which heals every point that uses them.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import blake3
import numpy as np
import pyarrow as pa

from catalog.errors import CombError
from catalog.maint import gc
from catalog.maint.heal import Healed, ParityCheck, check_parity, heal_pack
from catalog.maint.repack import copy_chunks, index_sealed
from catalog.repo import Repository
from catalog.store.chunks import decode_chunk
from catalog.store.index import (
    blob_rows,
    id_keys,
    ids_to_array,
    load_index,
)
from catalog.store.locks import locked
from catalog.store.packs import PackWriter, pack_name
from catalog.store.parquet_io import read_parquet
from catalog.store.sealing import Sealer

Progress = Callable[[int, int], None]
# Packs checked at once: each thread reads a whole pack (up to ~64 MiB held), then hashes it.
# Reading from the device overlaps better with 4 than with one per core: 1.03-1.17 GB/s against
# 0.84-1.00 GB/s with 2 on the 2-core bench machine, page cache dropped (bench/README.md).
SCRUB_THREADS = 4


@dataclass
class Damage:
    pack: str
    offset: int
    chunk_id: bytes
    why: str
    healable: bool = False  # parity rebuilds it


@dataclass
class Affected:
    point: str
    source: str
    extents: list[tuple[int, int]]  # (offset, length) on the disk


@dataclass
class ScrubReport:
    packs: int = 0
    packs_total: int = 0
    bytes: int = 0
    chunks_checked: int = 0  # chunks decoded (in packs whose hash failed)
    seconds: float = 0.0
    damaged: list[Damage] = field(default_factory=list)
    bad_packs: list[str] = field(default_factory=list)  # pack ids whose hash failed
    affected: list[Affected] = field(default_factory=list)
    quarantined: list[str] = field(default_factory=list)
    copied_chunks: int = 0
    parity: bool = False  # the repository has parity, and it was checked
    parity_problems: dict[str, str] = field(default_factory=dict)  # pack id -> what is wrong
    healed: list[Healed] = field(default_factory=list)  # what --repair did, per pack
    repaired: bool = False

    @property
    def unhealed(self) -> list[Damage]:
        """Damaged chunks parity does not heal (after --repair: that it did not heal)."""
        return [d for d in self.damaged if not d.healable]

    @property
    def remaining(self) -> list[Damage]:
        """Damaged chunks still damaged when scrub ends."""
        return self.unhealed if self.repaired else self.damaged

    @property
    def mb_s(self) -> float:
        return self.bytes / self.seconds / 1e6 if self.seconds else 0.0


@dataclass
class _Checked:
    nbytes: int
    damage: list[Damage]
    decoded: int
    parity_problem: str = ""


def _decode_all(
    where: str, data: bytes, cols: dict[str, list[object]], sealer: Sealer
) -> dict[bytes, tuple[int, str]]:
    """chunk id -> (offset, why) of the chunks of ``cols`` that do not decode from ``data``."""
    view = memoryview(data)
    bad = {}
    for cid, off, slen, rlen, codec in blob_rows(cols):
        assert isinstance(cid, bytes) and isinstance(off, int) and isinstance(slen, int)
        try:
            if off + slen > len(data):
                raise CombError(f"pack {where} offset {off}: beyond the end of the pack")
            at = f"pack {where} offset {off}"
            decode_chunk(view[off : off + slen], codec, rlen, cid, at, sealer)  # type: ignore[arg-type]
        except CombError as err:
            bad[cid] = (off, err.message)
    return bad


def _check_pack(repo: Repository, pid: str, rows: pa.Table, parity: bool) -> _Checked:
    """Bytes read, damaged chunks (each marked healable or not) and chunks decoded of one
    pack, and what is wrong with its parity file."""
    storage = repo.storage
    name = pack_name(pid)
    where = storage.local_path(name) or name
    try:
        data = storage.read(name)
    except (OSError, CombError) as err:
        msg = err.message if isinstance(err, CombError) else str(err)
        data, unreadable = b"", f"pack {where} cannot be read: {msg}"
    else:
        unreadable = ""
    intact = not unreadable and blake3.blake3(data, max_threads=1).hexdigest() == pid
    check = check_parity(storage, pid, data, intact) if parity else ParityCheck()
    if intact:
        return _Checked(len(data), [], 0, check.problem)
    cols = rows.to_pydict()
    bad = _decode_all(where, data, cols, storage.sealer) if data else {}
    if unreadable:
        damage = [Damage(pid, -1, b"", unreadable)]
    else:
        damage = [Damage(pid, off, cid, why) for cid, (off, why) in bad.items()]
        if not damage:
            why = f"pack {where} does not match its name (outside chunks)"
            damage = [Damage(pid, -1, b"", why)]
    if check.whole:
        for d in damage:
            d.healable = True
    elif check.rebuilt is not None:
        still = _decode_all(where, check.rebuilt, cols, storage.sealer)
        for d in damage:
            d.healable = bool(d.chunk_id) and d.chunk_id not in still
    problem = check.problem
    if parity and check.rebuilt is None and not problem:
        problem = "no usable parity"
    return _Checked(len(data), damage, len(cols["chunk_id"]) if data else 0, problem)


def affected_points(repo: Repository, ids: set[bytes]) -> list[Affected]:
    """Which points hold any of the chunk ``ids``, and at which disk extents."""
    if not ids:
        return []
    wanted = np.sort(np.array(sorted(ids), "S32"))
    out = []
    for p in repo.points():
        m = repo.manifest(p)
        hits: list[int] = []
        by_file: dict[str, list[tuple[int, int]]] = {}
        for leaf_no, file_id, ordinal in zip(
            m.leaf_nos.tolist(), m.leaf_files, m.leaf_ordinals.tolist(), strict=True
        ):
            by_file.setdefault(file_id, []).append((ordinal, leaf_no))
        for file_id, pairs in by_file.items():
            table = read_parquet(repo.storage, f"manifests/leaves/{file_id}.parquet")
            keys = id_keys(ids_to_array(table.column("chunk_id")))
            pos = np.searchsorted(wanted, keys)
            pos[pos == len(wanted)] = 0
            sel = np.flatnonzero(wanted[pos] == keys)
            if not len(sel):
                continue
            leaf_of = dict(pairs)
            leaves = table.column("leaf").to_numpy()[sel]
            slots = table.column("slot").to_numpy()[sel]
            for lf, sl in zip(leaves.tolist(), slots.tolist(), strict=True):
                if lf in leaf_of:
                    hits.append(leaf_of[lf] * p.leaf_chunks + sl)
        if hits:
            extents: list[tuple[int, int]] = []
            for c in sorted(set(hits)):
                start, length = c * p.chunk_size, min(p.chunk_size, p.size - c * p.chunk_size)
                if extents and extents[-1][0] + extents[-1][1] == start:
                    extents[-1] = (extents[-1][0], extents[-1][1] + length)
                else:
                    extents.append((start, length))
            out.append(Affected(p.id, p.source, extents))
    return out


def scrub(
    repo: Repository,
    sample_percent: float = 100.0,
    repair: bool = False,
    threads: int = SCRUB_THREADS,
    progress: Progress | None = None,
    seed: int | None = None,
) -> ScrubReport:
    t0 = time.perf_counter()
    storage = repo.storage
    index = load_index(storage)
    present = {
        n.rsplit("/", 1)[-1][: -len(".pack")] for n in storage.list("packs") if n.endswith(".pack")
    }
    packs = sorted(present)
    rep = ScrubReport(packs_total=len(packs))
    if sample_percent < 100:
        rng = random.Random(seed)
        sizes = {p: storage.size(pack_name(p)) for p in packs}
        budget = sum(sizes.values()) * sample_percent / 100
        rng.shuffle(packs)
        chosen, got = [], 0
        for p in packs:
            if got >= budget:
                break
            chosen.append(p)
            got += sizes[p]
        packs = sorted(chosen)
    by_pack = index.sort_by("pack")
    pcol = by_pack.column("pack").to_numpy(zero_copy_only=False)
    bounds = {}
    if len(pcol):
        names, starts = np.unique(pcol.astype(str), return_index=True)
        ends = [*starts[1:].tolist(), len(pcol)]
        bounds = dict(zip(names.tolist(), zip(starts.tolist(), ends, strict=True), strict=True))

    def rows_of(pid: str) -> pa.Table:
        a, b = bounds.get(pid, (0, 0))
        return by_pack.slice(a, b - a)

    rep.parity = repo.config.parity is not None
    with ThreadPoolExecutor(max(1, threads)) as pool:
        checks = pool.map(lambda pid: _check_pack(repo, pid, rows_of(pid), rep.parity), packs)
        for i, (pid, res) in enumerate(zip(packs, checks, strict=True)):
            rep.packs += 1
            rep.bytes += res.nbytes
            rep.chunks_checked += res.decoded
            rep.damaged += res.damage
            if res.parity_problem:
                rep.parity_problems[pid] = res.parity_problem
            if progress is not None:
                progress(i + 1, len(packs))
    rep.bad_packs = sorted({d.pack for d in rep.damaged})
    rep.seconds = time.perf_counter() - t0
    if repair and (rep.bad_packs or rep.parity_problems):
        _repair(repo, rep, rows_of)
    rep.affected = affected_points(repo, {d.chunk_id for d in rep.remaining if d.chunk_id})
    return rep


def _repair(repo: Repository, rep: ScrubReport, rows_of: Callable[[str], pa.Table]) -> None:
    """Under the exclusive lock: heal from parity what it heals (and write missing or damaged
    parity); copy the intact chunks of the other damaged packs into a new pack, then drop
    those packs (and their index rows) in prune's crash-safe order."""
    storage = repo.storage
    rep.repaired = True
    with locked(storage, "repair", command="scrub --repair"):
        lost: dict[str, bytes | None] = {}
        for pid in sorted(set(rep.bad_packs) | set(rep.parity_problems)):
            h = heal_pack(storage, pid, repo.config.parity)
            rep.healed.append(h)
            if h.action == "not healable":
                lost[pid] = h.rebuilt
        for d in rep.damaged:  # what the repair did decides, not the unlocked scan
            d.healable = d.pack not in lost
        writer = PackWriter(storage, parity=repo.config.parity)
        sealed = []
        copied: set[bytes] = set()
        try:
            for pid, best in lost.items():
                try:
                    ids, blobs, raws, codecs = copy_chunks(
                        storage, pid, rows_of(pid), copied, strict=False, data=best
                    )
                except (OSError, CombError):
                    continue  # unreadable: nothing to copy
                sealed += writer.add_many(ids, blobs, raws, codecs)
                copied.update(ids)
                rep.copied_chunks += len(ids)
            sealed += writer.close()
        except BaseException:
            writer.abort()
            raise
        for d in rep.damaged:  # a chunk parity rebuilt in a pack it cannot wholly rebuild
            if d.pack in lost and d.chunk_id in copied:
                d.healable = True
        if not lost:
            return
        index_sealed(storage, sealed)  # the copies are indexed before the damaged packs go
        plan = gc.Plan(packs=[pack_name(pid) for pid in lost])
        gc.drop_segments(repo, set(lost), plan)
        gc.execute(repo, plan)
        rep.quarantined = list(lost)
