"""Repacking (``comb prune``'s second step, FORMAT.md 13): the live chunks of packs that are
mostly garbage are copied into new packs and indexed, durably, before anything is removed; and
the chunk copying that ``scrub --repair`` shares. Runs alongside backups: it only adds files.
Never copies damage: every chunk is decoded and checked against its id first.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import blake3
import numpy as np
import pyarrow as pa

from catalog.errors import CorruptionError, RepositoryError
from catalog.repo import Repository
from catalog.store.chunks import decode_chunk
from catalog.store.index import (
    IndexSegmentWriter,
    blob_rows,
    contains,
    id_keys,
    ids_to_array,
    load_index,
    present_rows,
    sealed_to_table,
)
from catalog.store.packs import PackWriter, SealedPack, pack_name
from catalog.store.storage import Storage

# Repack a pack when its live chunks are less than this share of its stored bytes.
REPACK_BELOW = 0.5


def copy_chunks(
    storage: Storage,
    pid: str,
    rows: pa.Table,
    skip: set[bytes],
    strict: bool,
    data: bytes | None = None,
) -> tuple[list[bytes], list[bytes], list[int], list[int]]:
    """(ids, blobs, raw lengths, codecs) of the chunks ``rows`` (index rows of pack ``pid``)
    list, read from the pack once (or taken from ``data``, its bytes as far as parity could
    rebuild them), each checked against its id, ids in ``skip`` and repeats left out.
    ``strict``: any damage (the pack's name too) raises CorruptionError; otherwise a damaged
    chunk is just not copied. Never copies damage."""
    name = pack_name(pid)
    if data is None:
        data = storage.read(name)
    if strict and blake3.blake3(data).hexdigest() != pid:
        raise CorruptionError(f"{name} does not match its name")
    ids: list[bytes] = []
    blobs: list[bytes] = []
    raws: list[int] = []
    codecs: list[int] = []
    seen = set(skip)
    for cid, off, slen, raw_len, codec in blob_rows(rows):
        if cid in seen:
            continue
        blob = data[off : off + slen]
        try:
            if off + slen > len(data):
                raise CorruptionError(f"{name} offset {off}: beyond the end of the pack")
            decode_chunk(blob, codec, raw_len, cid, name, storage.sealer)
        except CorruptionError:
            if strict:
                raise
            continue
        seen.add(cid)
        ids.append(cid)
        blobs.append(blob)
        raws.append(raw_len)
        codecs.append(codec)
    return ids, blobs, raws, codecs


def index_sealed(storage: Storage, sealed: list[SealedPack]) -> None:
    """Commit an index segment for new packs (durable before anything they replace goes)."""
    if sealed:
        seg = IndexSegmentWriter(storage)
        seg.add(sealed_to_table(sealed))
        seg.commit()


@dataclass
class Repacked:
    retired: frozenset[str] = frozenset()  # pack ids whose live chunks were copied
    chunks: int = 0
    bytes: int = 0
    new_packs: int = 0
    damaged: list[str] = field(default_factory=list)


def repack_candidates(
    repo: Repository, live_ids: np.ndarray
) -> tuple[pa.Table, np.ndarray, list[str]]:
    """(index rows, live flag per row, packs whose live stored bytes are under REPACK_BELOW
    of their stored bytes but not zero)."""
    rows = present_rows(repo.storage, load_index(repo.storage), listed=True)
    if rows.num_rows == 0:
        return rows, np.zeros(0, bool), []
    hit = contains(live_ids, id_keys(ids_to_array(rows.column("chunk_id"))))
    packs = rows.column("pack").to_numpy(zero_copy_only=False)
    stored = rows.column("stored_len").to_numpy().astype(np.int64)
    names, inverse = np.unique(packs.astype(str), return_inverse=True)
    total = np.bincount(inverse, weights=stored, minlength=len(names))
    live = np.bincount(inverse, weights=np.where(hit, stored, 0), minlength=len(names))
    pick = (live > 0) & (live < REPACK_BELOW * total)
    return rows, hit, names[pick].tolist()


def repack_live(repo: Repository, live_ids: np.ndarray) -> Repacked:
    """Copy the live chunks of mostly-garbage packs into new packs and index them (durable)
    before anything is removed; runs alongside backups (it only adds files)."""
    storage = repo.storage
    rows, hit, cands = repack_candidates(repo, live_ids)
    if not cands:
        return Repacked()
    packs = rows.column("pack").to_numpy(zero_copy_only=False)
    keys = id_keys(ids_to_array(rows.column("chunk_id")))
    cand_set = set(cands)
    in_cand = np.array([p in cand_set for p in packs.tolist()], bool)
    covered = np.unique(keys[hit & ~in_cand])  # live chunks with a copy in a kept pack
    out = Repacked()
    writer = PackWriter(storage, parity=repo.config.parity)
    sealed = []
    copied: set[bytes] = set()
    retired = set()
    try:
        for pid in cands:
            sel = np.flatnonzero((packs == pid) & hit & ~contains(covered, keys))
            try:
                ids, blobs, raws, codecs = copy_chunks(
                    storage, pid, rows.take(pa.array(sel)), copied, strict=True
                )
            except (CorruptionError, RepositoryError) as err:
                out.damaged.append(err.message)
                continue
            sealed += writer.add_many(ids, blobs, raws, codecs)
            copied.update(ids)
            out.chunks += len(ids)
            out.bytes += sum(len(b) for b in blobs)
            retired.add(pid)
        sealed += writer.close()
    except BaseException:
        writer.abort()
        raise
    index_sealed(storage, sealed)
    out.new_packs = len(sealed)
    out.retired = frozenset(retired)
    return out
