"""``comb repair index``: rebuild the chunk index from the packs alone (FORMAT.md 6, 7).

Every pack ends with a table of its chunks, so the index is derived data: under the exclusive
lock (no backup is writing packs or segments), the tables of all packs are read (from the end
of each file, not the chunk data), written as one new segment, and only then are the old
segments removed. A crash in between leaves both (duplicate rows are harmless, section 7).
Packs whose table cannot be read are reported and left out: their chunks become missing, and
the next backup that sees the same data stores it again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pyarrow as pa

from catalog.errors import CombError
from catalog.repo import Repository
from catalog.store.blocks import BLOCKS_SUFFIX, block_list_name, parquet_of
from catalog.store.index import (
    INDEX_PREFIX,
    INDEX_SCHEMA,
    IndexSegmentWriter,
    sealed_to_table,
    segment_names,
)
from catalog.store.locks import locked
from catalog.store.packs import SealedPack, read_pack_entries
from catalog.store.parquet_io import read_parquet
from catalog.store.storage import Storage


@dataclass
class IndexRepair:
    packs: int = 0
    chunks: int = 0
    old_segments: int = 0
    unreadable: list[str] = field(default_factory=list)


def repair_index(repo: Repository, on_wait: Callable[[object], None] | None = None) -> IndexRepair:
    repo.require_writable()
    storage = repo.storage
    out = IndexRepair()
    with locked(storage, "repair", command="repair index", on_wait=on_wait):
        old = segment_names(storage)
        sealed = []
        for name in sorted(n for n in storage.list("packs") if n.endswith(".pack")):
            pid = name.rsplit("/", 1)[-1][: -len(".pack")]
            try:
                entries = read_pack_entries(storage, name, storage.local_path(name) or name)
            except CombError as err:
                out.unreadable.append(err.message)
                continue
            sealed.append(SealedPack.of(pid, entries, storage.size(name)))
            out.packs += 1
            out.chunks += len(entries)
        table = sealed_to_table(sealed) if sealed else None
        if table is not None and len(old) == 1 and _same_rows(storage, old[0], table):
            return out  # already the index the packs give (an encrypted repository would
            # otherwise write new bytes for the same rows: its Parquet nonces are random)
        if table is not None:
            seg = IndexSegmentWriter(storage)
            seg.add(table)
            new_id, _ = seg.commit()  # durable before any old segment goes
            new_name = f"index/{new_id}.parquet" if new_id else ""
        else:
            new_name = ""
        for name in old:
            if name != new_name:
                storage.remove(name)
                storage.remove(block_list_name(name))  # (after its file: FORMAT.md 7.1)
                out.old_segments += 1
        for name in storage.list(INDEX_PREFIX):  # block lists of segments already lost
            if name.endswith(BLOCKS_SUFFIX) and not storage.exists(parquet_of(name)):
                storage.remove(name)
    return out


def _same_rows(storage: Storage, name: str, table: pa.Table) -> bool:
    try:
        return read_parquet(storage, name, INDEX_SCHEMA.names).equals(table)
    except CombError:
        return False
