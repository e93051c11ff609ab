"""Packs: immutable files of compressed chunks, footer last, named by the BLAKE3 of their bytes.

Layout (FORMAT.md "Packs"): a 16-byte header, the stored chunks back to back, a table of one
52-byte entry per chunk, and a 32-byte trailer. The footer makes a pack self-describing, so the
index can be rebuilt from packs alone.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass

import blake3

from catalog.errors import CorruptionError
from catalog.store.parity import ParityGeometry, ParityWriter
from catalog.store.sealing import PLAIN, Sealer
from catalog.store.storage import NewFile, Storage

PACK_MAGIC = b"COMBPACK"
PACK_END_MAGIC = b"COMBPEND"
PACK_VERSION = 1
PACK_HEADER = struct.Struct("<8sHHI")  # magic, version, flags, reserved
PACK_ENTRY = struct.Struct(
    "<32sQIIBBH"
)  # chunk id, offset, stored len, raw len, codec, flags, rsvd
PACK_TRAILER = struct.Struct("<II16s8s")  # entry count, entries bytes, entries hash[:16], magic
PACK_HEADER_BYTES = PACK_HEADER.size
PACK_ENTRY_BYTES = PACK_ENTRY.size
PACK_TRAILER_BYTES = PACK_TRAILER.size
# Header flag / entry flag bit 0: the entry table / the blob is sealed (FORMAT.md 21).
PACK_FLAG_SEALED = 1
# Seal a pack once this many stored bytes are in it: large enough for sequential restore reads
# and few files, small enough to bound a worker's unsealed data. bench/README.md "pack size".
DEFAULT_PACK_TARGET_BYTES = 64 * 1024 * 1024


def pack_name(pack_id: str) -> str:
    return f"packs/{pack_id[:2]}/{pack_id}.pack"


@dataclass(frozen=True)
class PackEntry:
    chunk_id: bytes
    offset: int
    stored_len: int
    raw_len: int
    codec: int


@dataclass
class SealedPack:
    """Index rows of one sealed pack, as parallel lists (cheap to turn into Arrow)."""

    pack_id: str
    chunk_ids: list[bytes]
    offsets: list[int]
    stored_lens: list[int]
    raw_lens: list[int]
    codecs: list[int]
    size: int

    @staticmethod
    def of(pack_id: str, entries: Sequence[PackEntry], size: int) -> SealedPack:
        return SealedPack(
            pack_id=pack_id,
            chunk_ids=[e.chunk_id for e in entries],
            offsets=[e.offset for e in entries],
            stored_lens=[e.stored_len for e in entries],
            raw_lens=[e.raw_len for e in entries],
            codecs=[e.codec for e in entries],
            size=size,
        )


class PackWriter:
    """Appends stored chunks to one open pack and seals it at the target size.

    With ``parity`` (the repository's geometry), every byte written to the pack is also fed to
    a ParityWriter (one stripe buffered), whose file is committed just before the pack: a crash
    leaves at most a parity file without its pack (prune removes it), never the reverse."""

    def __init__(
        self,
        storage: Storage,
        target_bytes: int = DEFAULT_PACK_TARGET_BYTES,
        parity: ParityGeometry | None = None,
    ) -> None:
        self._storage = storage
        self._target = target_bytes
        self._parity_geometry = parity
        self._parity: ParityWriter | None = None
        self._file: NewFile | None = None
        self._hash = blake3.blake3()
        self._entries: list[PackEntry] = []
        self._pending_bytes = 0
        self.parity_cpu_s = 0.0  # this thread's CPU in the parity encoder (the bench's profile)

    def _open(self) -> NewFile:
        new = self._storage.create(bulk=True)
        header = self._header()
        new.write(header)
        self._hash = blake3.blake3()
        self._hash.update(header)
        self._entries = []
        self._file = new
        if self._parity_geometry is not None:
            self._parity = ParityWriter(self._storage, self._parity_geometry)
            self._parity.update(header)
        return new

    def add_many(
        self,
        ids: list[bytes],
        blobs: Sequence[bytes | memoryview],
        raw_lens: list[int],
        codecs: list[int],
    ) -> list[SealedPack]:
        """Append stored chunks; returns the packs sealed on the way (usually none)."""
        sealed: list[SealedPack] = []
        pending: list[bytes | memoryview] = []
        for cid, blob, raw_len, codec in zip(ids, blobs, raw_lens, codecs, strict=True):
            new = self._file or self._open()
            offset = new.tell() + self._pending_bytes
            pending.append(blob)
            self._pending_bytes += len(blob)
            self._hash.update(blob)
            self._entries.append(PackEntry(cid, offset, len(blob), raw_len, codec))
            if offset + len(blob) >= self._target:
                self._write(pending)
                pending = []
                sealed.append(self.seal())
        if pending:
            self._write(pending)
        return sealed

    def _write(self, pending: list[bytes | memoryview]) -> None:
        """One gathered write for many blobs (one syscall per batch, not per chunk)."""
        assert self._file is not None
        self._file.write_many(pending)
        if self._parity is not None:
            t0 = time.thread_time()
            for blob in pending:
                self._parity.update(blob)
            self.parity_cpu_s += time.thread_time() - t0
        self._pending_bytes = 0

    def _header(self) -> bytes:
        flags = PACK_FLAG_SEALED if self._storage.sealer.encrypted else 0
        return PACK_HEADER.pack(PACK_MAGIC, PACK_VERSION, flags, 0)

    def seal(self) -> SealedPack:
        new = self._file
        assert new is not None, "seal() without an open pack"
        sealer = self._storage.sealer
        eflags = PACK_FLAG_SEALED if sealer.encrypted else 0
        table = b"".join(
            PACK_ENTRY.pack(e.chunk_id, e.offset, e.stored_len, e.raw_len, e.codec, eflags, 0)
            for e in self._entries
        )
        table = sealer.seal_table(table, self._header())
        trailer = PACK_TRAILER.pack(
            len(self._entries), len(table), blake3.blake3(table).digest()[:16], PACK_END_MAGIC
        )
        new.write(table)
        new.write(trailer)
        self._hash.update(table)
        self._hash.update(trailer)
        pack_id = self._hash.hexdigest()
        size = new.tell()
        if self._parity is not None:
            t0 = time.thread_time()
            self._parity.update(table)
            self._parity.update(trailer)
            self._parity.commit(pack_id)
            self._parity = None
            self.parity_cpu_s += time.thread_time() - t0
        new.commit(pack_name(pack_id))
        entries = self._entries
        self._file = None
        self._entries = []
        return SealedPack.of(pack_id, entries, size)

    def close(self) -> list[SealedPack]:
        """Seal the open pack, if any."""
        if self._file is None:
            return []
        return [self.seal()]

    def abort(self) -> None:
        if self._parity is not None:
            self._parity.abort()
            self._parity = None
        if self._file is not None:
            self._file.abort()
            self._file = None


def parse_pack(
    data: bytes, where: str, data_end: int | None = None, sealer: Sealer = PLAIN
) -> list[PackEntry]:
    """Parse and check a whole pack's header, footer and trailer (not the chunk contents).
    ``data_end``: where the data area ends when ``data`` holds only header + table + trailer.
    ``sealer``: the repository's; an encrypted repository's packs must be sealed."""
    if len(data) < PACK_HEADER_BYTES + PACK_TRAILER_BYTES:
        raise CorruptionError(f"pack {where} is truncated ({len(data)} bytes)")
    magic, version, flags, rsvd = PACK_HEADER.unpack_from(data, 0)
    if magic != PACK_MAGIC:
        raise CorruptionError(f"pack {where} has a bad header magic at offset 0")
    if version != PACK_VERSION:
        raise CorruptionError(f"pack {where} has unknown pack version {version}")
    if flags & ~PACK_FLAG_SEALED or rsvd:
        # A pack using flags this comb does not know needs a comb that knows them.
        raise CorruptionError(f"pack {where} uses header flags {flags:#x} this comb does not know")
    sealed = flags & PACK_FLAG_SEALED
    if bool(sealed) != sealer.encrypted:
        state = "sealed (encrypted)" if sealed else "not sealed"
        raise CorruptionError(
            f"pack {where} is {state}, unlike the repository (tampered with or misplaced)"
        )
    overhead = sealer.overhead
    tpos = len(data) - PACK_TRAILER_BYTES
    count, table_len, table_hash, end_magic = PACK_TRAILER.unpack_from(data, tpos)
    if end_magic != PACK_END_MAGIC:
        raise CorruptionError(f"pack {where} has a bad trailer at offset {tpos}")
    start = tpos - table_len
    if table_len != count * PACK_ENTRY_BYTES + overhead or start < PACK_HEADER_BYTES:
        raise CorruptionError(f"pack {where} has an inconsistent entry table at offset {tpos}")
    table = data[start:tpos]
    if blake3.blake3(table).digest()[:16] != table_hash:
        raise CorruptionError(f"pack {where} has a corrupt entry table at offset {start}")
    table = sealer.open_table(table, bytes(data[:PACK_HEADER_BYTES]), where)
    entries = []
    for i in range(count):
        cid, off, slen, rlen, codec, eflags, ersvd = PACK_ENTRY.unpack_from(
            table, i * PACK_ENTRY_BYTES
        )
        if eflags != sealed or ersvd:
            raise CorruptionError(f"pack {where}: entry {i} uses flags this comb does not know")
        if off < PACK_HEADER_BYTES or off + slen > (start if data_end is None else data_end):
            raise CorruptionError(f"pack {where}: entry {i} points outside the data area")
        entries.append(PackEntry(cid, off, slen, rlen, codec))
    return entries


def read_pack_entries(storage: Storage, name: str, where: str) -> list[PackEntry]:
    """A pack's entry table, read from its end alone (for rebuilding the index): the trailer,
    then the table, both checked as ``parse_pack`` checks them."""
    size = storage.size(name)
    if size < PACK_HEADER_BYTES + PACK_TRAILER_BYTES:
        raise CorruptionError(f"pack {where} is truncated ({size} bytes)")
    trailer = storage.read(name, size - PACK_TRAILER_BYTES, PACK_TRAILER_BYTES)
    count, table_len, _, end_magic = PACK_TRAILER.unpack(trailer)
    overhead = storage.sealer.overhead
    if end_magic != PACK_END_MAGIC or table_len != count * PACK_ENTRY_BYTES + overhead:
        raise CorruptionError(
            f"pack {where} has a bad trailer at offset {size - PACK_TRAILER_BYTES}"
        )
    start = size - PACK_TRAILER_BYTES - table_len
    if start < PACK_HEADER_BYTES:
        raise CorruptionError(f"pack {where} has an inconsistent entry table")
    header = storage.read(name, 0, PACK_HEADER_BYTES)
    table = storage.read(name, start, table_len)
    return parse_pack(header + table + trailer, where, data_end=start, sealer=storage.sealer)
