"""The restore-side stages: locate chunks, read packs in large ranges, decode and check, write.

Every chunk read is decompressed and checked against its BLAKE3 id (catalog.store.chunks); damage
is a CorruptionError naming the pack path and offset. Pack reads are coalesced by the one policy
every reader shares (``catalog.read.coalesce``).

Owns the restore's read tasks and their execution. Must not: decide the coalescing policy, or
know how it is scheduled (threads: the restore job in ``pipeline``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from catalog.errors import CorruptionError, RepositoryError
from catalog.read.coalesce import READ_BYTES, coalesce
from catalog.store.chunks import decode_chunk
from catalog.store.index import ids_to_array
from catalog.store.leaves import Leaf
from catalog.store.packs import pack_name
from catalog.store.storage import Storage
from stages.target import RestoreTarget, thread_buffer

_BLKZEROOUT = 0x127F
_MAX_IOV = 512


@dataclass(frozen=True)
class ReadTask:
    """One ranged pack read and the chunks to decode from it, with where each goes."""

    pack: str
    start: int
    end: int
    # (offset in pack, stored len, raw len, codec, chunk id, target offsets)
    chunks: list[tuple[int, int, int, int, bytes, list[int]]]


def leaves_to_table(
    leaf_nos: list[int], leaves: list[Leaf], chunk: int, leaf_chunks: int
) -> pa.Table:
    """Manifest rows (offset, chunk_id) of several leaves."""
    offs = [
        (np.int64(n) * leaf_chunks + leaf.slots.astype(np.int64)) * chunk
        for n, leaf in zip(leaf_nos, leaves, strict=True)
    ]
    ids = [leaf.ids for leaf in leaves]
    off = np.concatenate(offs) if offs else np.empty(0, np.int64)
    idarr = np.ascontiguousarray(np.concatenate(ids)) if ids else np.empty((0, 32), np.uint8)
    return pa.table(
        {
            "offset": pa.array(off, pa.int64()),
            "chunk_id": pa.Array.from_buffers(
                pa.binary(32), len(idarr), [None, pa.py_buffer(idarr)]
            ),
        }
    )


def plan_reads(
    rows: pa.Table,
    locations: pa.Table,
    where: str,
    chunk_size: int | None = None,
    disk_size: int | None = None,
) -> list[ReadTask]:
    """Join manifest rows with the index and group them into coalesced pack reads.

    With ``chunk_size`` and ``disk_size``, every chunk's plain length must be the length its
    position implies (a full chunk, or the partial last one)."""
    locs = locations.rename_columns(
        ["pack_offset" if c == "offset" else c for c in locations.column_names]
    )
    joined = rows.join(locs, "chunk_id", join_type="left outer")
    if joined.column("pack").null_count:
        missing = joined.filter(joined.column("pack").is_null())
        cid = bytes(ids_to_array(missing.column("chunk_id"))[0]).hex()[:16]
        raise CorruptionError(
            f"{where}: chunk {cid} is not in the index ({missing.num_rows} missing)"
        )
    if chunk_size is not None and disk_size is not None and joined.num_rows:
        offs = joined.column("offset").to_numpy()
        expect = np.minimum(chunk_size, disk_size - offs)
        bad = np.flatnonzero(joined.column("raw_len").to_numpy() != expect)
        if len(bad):
            i = int(bad[0])
            cid = bytes(ids_to_array(joined.column("chunk_id"))[i]).hex()[:16]
            raise CorruptionError(
                f"{where}: chunk {cid} at offset {int(offs[i])} has the wrong length for its "
                f"place ({len(bad)} such chunk(s))"
            )
    joined = joined.sort_by([("pack", "ascending"), ("pack_offset", "ascending")])
    packs = joined.column("pack").to_pylist()
    poffs = joined.column("pack_offset").to_pylist()
    slens = joined.column("stored_len").to_pylist()
    rlens = joined.column("raw_len").to_pylist()
    codecs = joined.column("codec").to_pylist()
    disk = joined.column("offset").to_pylist()
    ids = ids_to_array(joined.column("chunk_id"))
    tasks: list[ReadTask] = []
    for a, b in coalesce(packs, poffs, slens):
        end = max(poffs[i] + slens[i] for i in range(a, b))
        task = ReadTask(packs[a], poffs[a], end, [])
        for i in range(a, b):
            if i > a and poffs[i] == poffs[i - 1]:  # one chunk at several places of the disk
                task.chunks[-1][5].append(disk[i])
            else:
                chunk = (poffs[i], slens[i], rlens[i], codecs[i], bytes(ids[i]), [disk[i]])
                task.chunks.append(chunk)
        tasks.append(task)
    return tasks


def _read_buffer(size: int) -> memoryview:
    return memoryview(thread_buffer("read", size, READ_BYTES))


def execute_read(storage: Storage, task: ReadTask, target: RestoreTarget | None) -> int:
    """Read one coalesced range, check every chunk, write it; returns bytes written."""
    name = pack_name(task.pack)
    where_path = storage.local_path(name) or name
    length = task.end - task.start
    view = _read_buffer(length)[:length]
    try:
        got = storage.read_into(name, task.start, view)
    except RepositoryError:
        if not storage.exists(name):
            raise CorruptionError(f"pack {where_path} is missing") from None
        raise
    if got != length:
        raise CorruptionError(
            f"pack {where_path} is truncated (wanted bytes {task.start}-{task.end})"
        )
    pieces: list[tuple[int, bytes]] = []
    for poff, slen, rlen, codec, cid, targets in task.chunks:
        blob = view[poff - task.start : poff - task.start + slen]
        plain = decode_chunk(
            blob, codec, rlen, cid, f"pack {where_path} offset {poff}", storage.sealer
        )
        pieces.extend((t, plain) for t in targets)
    if target is None:
        return sum(len(p) for _, p in pieces)
    return target.write_pieces(pieces)
