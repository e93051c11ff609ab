"""``comb scrub``: read every pack (or a sample), find each damaged chunk, say which recovery
points and disk extents it hurts, and with ``--repair`` isolate it so a later backup heals it.

A pack is named by the BLAKE3 of its bytes, so one hash of the whole file checks every byte of
it (fast: BLAKE3 runs at several GB/s and releases the GIL, so packs are checked on threads).
Only a pack whose hash does not match is looked into: each of its chunks is decompressed and
checked against its id, which finds exactly the damaged chunks.

Repair without parity (FORMAT.md 15.2 is to come): under the exclusive lock, the pack's intact
chunks are copied into a new pack (each checked on the way) and indexed, and the damaged pack is
removed. Its damaged chunks are then missing rather than wrong; the next backup that reads the
same data stores them again (the dedup index knows only chunks whose pack exists), which heals
every point that uses them.
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

from . import gc
from .chunks import decode_chunk
from .errors import CombError
from .gc import copy_chunks, index_sealed
from .index import (
    id_keys,
    ids_to_array,
    load_index,
)
from .locks import locked
from .packs import PackWriter, pack_name
from .parquet_io import read_parquet
from .repo import Repository

Progress = Callable[[int, int], None]


@dataclass
class Damage:
    pack: str
    offset: int
    chunk_id: bytes
    why: str


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

    @property
    def mb_s(self) -> float:
        return self.bytes / self.seconds / 1e6 if self.seconds else 0.0


def _check_pack(repo: Repository, pid: str, rows: pa.Table) -> tuple[int, list[Damage], int]:
    """(bytes read, damaged chunks, chunks decoded) of one pack."""
    name = pack_name(pid)
    where = repo.storage.local_path(name) or name
    try:
        data = repo.storage.read(name)
    except (OSError, CombError) as err:
        msg = err.message if isinstance(err, CombError) else str(err)
        return 0, [Damage(pid, -1, b"", f"pack {where} cannot be read: {msg}")], 0
    if blake3.blake3(data, max_threads=1).hexdigest() == pid:
        return len(data), [], 0
    bad = []
    view = memoryview(data)
    cols = rows.to_pydict()
    for cid, off, slen, rlen, codec in zip(
        cols["chunk_id"],
        cols["offset"],
        cols["stored_len"],
        cols["raw_len"],
        cols["codec"],
        strict=True,
    ):
        try:
            if off + slen > len(data):
                raise CombError(f"pack {where} offset {off}: beyond the end of the pack")
            decode_chunk(
                view[off : off + slen],
                codec,
                rlen,
                cid,
                f"pack {where} offset {off}",
                repo.storage.keys,
            )
        except CombError as err:
            bad.append(Damage(pid, off, cid, err.message))
    if not bad:
        bad.append(Damage(pid, -1, b"", f"pack {where} does not match its name (outside chunks)"))
    return len(data), bad, len(cols["chunk_id"])


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
    threads: int = 2,
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

    with ThreadPoolExecutor(max(1, threads)) as pool:
        for i, (n, bad, decoded) in enumerate(
            pool.map(lambda pid: _check_pack(repo, pid, rows_of(pid)), packs)
        ):
            rep.packs += 1
            rep.bytes += n
            rep.chunks_checked += decoded
            rep.damaged += bad
            if progress is not None:
                progress(i + 1, len(packs))
    rep.bad_packs = sorted({d.pack for d in rep.damaged})
    rep.seconds = time.perf_counter() - t0
    ids = {d.chunk_id for d in rep.damaged if d.chunk_id}
    rep.affected = affected_points(repo, ids)
    if repair and rep.bad_packs:
        _quarantine(repo, rep, rows_of)
    return rep


def _quarantine(repo: Repository, rep: ScrubReport, rows_of: Callable[[str], pa.Table]) -> None:
    """Copy the intact chunks of damaged packs into a new pack, then drop the damaged packs
    (and their index rows) under the exclusive lock, in prune's crash-safe order."""
    storage = repo.storage
    bad_ids = {d.chunk_id for d in rep.damaged}
    with locked(storage, "repair", command="scrub --repair"):
        writer = PackWriter(storage)
        sealed = []
        try:
            for pid in rep.bad_packs:
                try:
                    ids, blobs, raws, codecs = copy_chunks(
                        storage, pid, rows_of(pid), bad_ids, strict=False
                    )
                except (OSError, CombError):
                    continue  # unreadable: nothing to copy
                sealed += writer.add_many(ids, blobs, raws, codecs)
                rep.copied_chunks += len(ids)
            sealed += writer.close()
        except BaseException:
            writer.abort()
            raise
        index_sealed(storage, sealed)  # the copies are indexed before the damaged packs go
        plan = gc.Plan(packs=[pack_name(pid) for pid in rep.bad_packs])
        gc.drop_segments(repo, set(rep.bad_packs), plan)
        gc.execute(repo, plan)
        rep.quarantined = list(rep.bad_packs)
