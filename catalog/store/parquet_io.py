"""Writing Parquet files into the storage interface, named by the BLAKE3 of their bytes."""

from __future__ import annotations

import io
import os
from typing import Any

import blake3
import pyarrow as pa
import pyarrow.parquet as pq

from catalog.errors import CombError, CorruptionError, RepositoryError
from catalog.store.blocks import (
    BLOCKS_DOC_KIND,
    BLOCKS_SUFFIX,
    BlockHasher,
    BlockList,
    VerifiedFile,
    block_list_name,
    encode,
)
from catalog.store.storage import NewFile, Storage

# zstd inside Parquet; dictionary encoding keeps repeated pack/file ids tiny.
PARQUET_COMPRESSION = "zstd"


class _HashingSink(io.RawIOBase):
    """A write-only file object that hashes what it forwards to a NewFile."""

    def __init__(self, new: NewFile, blocks: BlockHasher | None = None) -> None:
        super().__init__()
        self._new = new
        self.hash = blake3.blake3()
        self.blocks = blocks

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:  # type: ignore[no-untyped-def, override]
        view = memoryview(data).cast("B")
        self.hash.update(view)
        if self.blocks is not None:
            self.blocks.update(view)
        self._new.write(view)
        return len(view)

    def tell(self) -> int:
        return self._new.tell()


class ParquetStreamWriter:
    """Streams record batches into a new Parquet file; commit names it by content."""

    def __init__(
        self,
        storage: Storage,
        schema: pa.Schema,
        row_group_rows: int = 65536,
        delta_columns: tuple[str, ...] = (),
        dictionary_columns: tuple[str, ...] = (),
        block_list: bool = False,
    ) -> None:
        """``delta_columns``: sorted or small integers, DELTA_BINARY_PACKED (18x smaller for a
        root than the default); ``dictionary_columns``: few distinct values (pack/file ids);
        every other column is PLAIN (chunk ids are random: a dictionary would only cost).
        ``block_list``: also write the file's block list (``catalog.store.blocks``) on commit."""
        self._storage = storage
        self._new = storage.create()
        self._sink = _HashingSink(self._new, BlockHasher() if block_list else None)
        self.blocks_id: str | None = None  # the block list's BLAKE3, once committed
        encodings = {
            f.name: "DELTA_BINARY_PACKED" if f.name in delta_columns else "PLAIN"
            for f in schema
            if f.name not in dictionary_columns
        }
        self._writer = pq.ParquetWriter(
            self._sink,
            schema,
            compression=PARQUET_COMPRESSION,
            write_statistics=True,
            use_dictionary=list(dictionary_columns),
            column_encoding=encodings,
            write_page_checksum=True,
            # Parquet modular encryption (AES-GCM, footer too) in an encrypted repository.
            encryption_properties=storage.sealer.parquet_encryption(),
        )
        self._schema = schema
        self._row_group_rows = row_group_rows
        self.rows = 0

    def write(self, table: pa.Table | pa.RecordBatch) -> None:
        if table.num_rows:
            self._writer.write(table, row_group_size=self._row_group_rows)
            self.rows += table.num_rows

    def commit(self, prefix: str, ranges: bytes = b"", covered_rows: int = 0) -> tuple[str, int]:
        """Close, and commit as ``prefix/<blake3 hex>.parquet``; returns (id, bytes). With a
        block list, it is committed next as ``prefix/<id>.blocks`` (with the position ranges
        given, covering ``covered_rows`` rows; sealed in an encrypted repository: the ranges
        tell where a disk changed), and its BLAKE3 kept in ``blocks_id``."""
        self._writer.close()
        file_id = self._sink.hash.hexdigest()
        size = self._new.tell()
        self._new.commit(f"{prefix}/{file_id}.parquet")
        if self._sink.blocks is not None:
            hasher = self._sink.blocks
            data = encode(hasher.finish(), size, hasher.block_bytes, ranges, covered_rows)
            data = self._storage.sealer.seal_doc(data, BLOCKS_DOC_KIND)
            self._storage.write_atomic(f"{prefix}/{file_id}{BLOCKS_SUFFIX}", data)
            self.blocks_id = blake3.blake3(data).hexdigest()
            size += len(data)
        return file_id, size

    def abort(self) -> None:
        try:
            self._writer.close()
        except Exception:  # noqa: BLE001 - aborting; the temp file goes anyway
            pass
        self._new.abort()


def read_verified(storage: Storage, name: str) -> bytes:
    """The bytes of a content-named metadata file, checked against its name before any parser
    sees them: a damaged Parquet footer can abort pyarrow's C++ reader (seen: ``terminate
    called after throwing parquet::ParquetException``), so damage must be caught first. On
    object storage through its local copies (``verified_path``): an immutable, content-named
    file is fetched once, not at every command (a backup reads every index segment)."""
    stem = _stem(name)
    if len(stem) == 64 and storage.local_path(name) is None:
        data = _read_copy(storage.local_copy(name))
        if data is None or blake3.blake3(data).hexdigest() != stem:  # trimmed meanwhile, or bad
            data = _read_copy(verified_path(storage, name))  # (fetched again, checked)
        if data is None:
            raise RepositoryError(f"cannot read the local copy of {name}: it went away")
        return data
    if not storage.exists(name):
        raise RepositoryError(f"missing repository file {storage.local_path(name) or name}")
    data = storage.read(name)
    if len(stem) == 64 and blake3.blake3(data).hexdigest() != stem:
        where = storage.local_path(name) or name
        raise CorruptionError(f"{where} does not match its name (damaged)")
    return data


def verified_path(storage: Storage, name: str) -> str:
    """A local file of a content-named metadata file (``Storage.local_copy``), checked against
    its name, for readers that take a path. A damaged local copy of an object-storage file is
    fetched again; only a fetched file that does not match is damage."""
    path = storage.local_copy(name)  # (object storage: fetched now unless cached)
    if not os.path.exists(path):
        raise RepositoryError(f"missing repository file {storage.local_path(name) or name}")
    stem = _stem(name)
    if len(stem) != 64 or _digest(path) == stem:
        return path
    if storage.local_path(name) is None:  # a local copy went bad: fetched again, once
        os.unlink(path)
        path = storage.local_copy(name)
        if _digest(path) == stem:
            return path
        os.unlink(path)
    raise CorruptionError(f"{storage.local_path(name) or name} does not match its name (damaged)")


def _stem(name: str) -> str:
    """What a content-named file's name says its BLAKE3 is (64 hex digits where it is one)."""
    return name.rsplit("/", 1)[-1].split(".", 1)[0]


def _read_copy(path: str) -> bytes | None:
    """A local copy's bytes; None when it is gone (another process trimmed the copies)."""
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise RepositoryError(f"cannot read {path}: {err.strerror or err}") from None


def _digest(path: str) -> str:
    hasher = blake3.blake3()
    try:
        hasher.update_mmap(path)
    except OSError as err:
        raise RepositoryError(f"cannot read {path}: {err.strerror or err}") from None
    return str(hasher.hexdigest())


def read_parquet(storage: Storage, name: str, columns: list[str] | None = None) -> pa.Table:
    """Read a whole Parquet object, translating damage into a CorruptionError."""
    data = read_verified(storage, name)
    try:  # (ParquetFile: half the cost of read_table on a small file, which goes by datasets)
        file = pq.ParquetFile(
            pa.BufferReader(data),
            page_checksum_verification=True,
            decryption_properties=storage.sealer.parquet_decryption(),
        )
        missing = [c for c in columns or () if c not in file.schema_arrow.names]
        if missing:  # (ParquetFile.read would leave it out silently)
            raise pa.ArrowInvalid(f"no column {missing[0]!r}")
        return file.read(columns=columns)
    except (pa.ArrowException, OSError) as err:
        raise unreadable(name, err, storage.sealer.encrypted) from None


def unreadable(name: str, err: Exception, sealed: bool = False) -> CorruptionError:
    """The error for a Parquet file pyarrow refuses. In an encrypted repository (``sealed``)
    the file's bytes matched its name, so a refusal means it was made by someone without the
    key: tampering (or damage from before it was named)."""
    text = str(err)
    if sealed or "ecrypt" in text or "ncrypt" in text:
        return CorruptionError(f"{name} fails authentication (tampered with or damaged: {text})")
    return CorruptionError(f"{name} is not a readable Parquet file ({text})")


def load_block_list(storage: Storage, name: str, blocks_id: str) -> BlockList:
    """The block list of ``name`` (a ``.parquet`` file), checked against ``blocks_id``, its
    BLAKE3 as a point document gives it (FORMAT.md 7.1)."""
    list_name = block_list_name(name)
    where = storage.local_path(list_name) or list_name
    if not storage.exists(list_name):
        raise RepositoryError(f"missing repository file {where}")
    data = storage.read(list_name)
    if blake3.blake3(data).hexdigest() != blocks_id:
        raise CorruptionError(f"{where} does not match the block list its point names (damaged)")
    data = storage.sealer.open_doc(data, BLOCKS_DOC_KIND, where)
    return BlockList.parse(data, where)


def _usable_block_list(storage: Storage, name: str, blocks_id: str | None) -> BlockList | None:
    """The block list, or None when there is none to use: a missing or damaged block list
    only costs a check of the whole file (``verify`` reports it)."""
    if blocks_id is None:
        return None
    try:
        return load_block_list(storage, name, blocks_id)
    except CombError:
        return None


def open_parquet(
    storage: Storage,
    name: str,
    blocks: str | BlockList | None = None,
    read_dictionary: list[str] | None = None,
) -> pq.ParquetFile:
    """Random access by row group to a checked metadata file. With ``blocks`` (its block list,
    or the list's BLAKE3) only the blocks read are checked (``catalog.store.blocks``); without, the
    file is checked whole and held in memory (metadata files are small next to the data they
    describe, ~2 bytes per KiB of disk for a full leaves file)."""
    if not isinstance(blocks, BlockList):
        blocks = _usable_block_list(storage, name, blocks)
    source: Any = (
        VerifiedFile(storage, name, blocks)
        if blocks is not None
        else pa.BufferReader(read_verified(storage, name))
    )
    try:
        return pq.ParquetFile(
            source,
            read_dictionary=read_dictionary,
            page_checksum_verification=True,
            decryption_properties=storage.sealer.parquet_decryption(),
        )
    except (pa.ArrowException, OSError) as err:
        raise unreadable(name, err, storage.sealer.encrypted) from None
