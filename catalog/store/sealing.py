"""The sealer: what a repository does to every object it stores, held by its ``Storage``.

A repository holds exactly one sealer for its lifetime, chosen by ``config.json``: ``PLAIN``
(``encryption: none``), which stores objects as they are, or the AES-256-GCM sealer of an
encrypted repository (``catalog.store.crypto.AesGcmSealer``, built from the unwrapped keys).
Every module that writes or reads an object asks the storage's sealer to seal or open it,
instead of branching on "is this repository encrypted". A module that only needs to know (to
choose a faster plain path, or to word a message) reads ``sealer.encrypted``.

Owns: the ``Sealer`` interface and the plain sealer. Must not: know key files, passwords or
ciphers (``crypto``), or do I/O.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import blake3

# A chunk's hash object from its bytes (``.digest()`` is the 32-byte chunk id).
ChunkHasher = Callable[[bytes | memoryview], Any]


class Sealer(Protocol):
    """Seals and opens a repository's objects (FORMAT.md 21); plain or encrypted."""

    @property
    def encrypted(self) -> bool: ...

    @property
    def overhead(self) -> int:
        """Bytes sealing adds to a blob, a pack's entry table or an overlay record."""
        ...

    @property
    def chunk_hasher(self) -> ChunkHasher:
        """BLAKE3 of a chunk's plain bytes; keyed in an encrypted repository."""
        ...

    def for_workers(self) -> Sealer:
        """What pipeline workers receive (never a master secret)."""
        ...

    def seal_blob(self, blob: bytes, cid: bytes) -> bytes: ...
    def seal_blob_into(self, blob: bytes | memoryview, cid: bytes, out: memoryview) -> None:
        """``seal_blob`` written into ``out``, which is exactly ``len(blob) + overhead``."""
        ...

    def open_blob(
        self, sealed: bytes | memoryview, cid: bytes, where: str
    ) -> bytes | memoryview: ...

    def seal_table(self, table: bytes, header: bytes) -> bytes: ...
    def open_table(self, sealed: bytes, header: bytes, where: str) -> bytes: ...
    def seal_record(self, payload: bytes | memoryview, head: bytes) -> bytes | memoryview: ...
    def open_record(
        self, sealed: bytes | memoryview, head: bytes, where: str
    ) -> bytes | memoryview: ...
    def seal_doc(self, raw: bytes, kind: str) -> bytes: ...
    def open_doc(self, raw: bytes, kind: str, where: str) -> bytes: ...

    def parquet_encryption(self) -> Any:
        """pyarrow's encryption properties for new Parquet files (None: plain)."""
        ...

    def parquet_decryption(self) -> Any:
        """pyarrow's decryption properties for the repository's Parquet files (None: plain)."""
        ...


class PlainSealer:
    """The sealer of a repository made with ``--encryption none``: objects stay as they are."""

    encrypted = False
    overhead = 0
    chunk_hasher: ChunkHasher = staticmethod(blake3.blake3)  # type: ignore[assignment]

    def __repr__(self) -> str:
        return "PLAIN"

    def __reduce__(self) -> str:  # one instance per process, also after crossing to a worker
        return "PLAIN"

    def for_workers(self) -> PlainSealer:
        return self

    def seal_blob(self, blob: bytes, cid: bytes) -> bytes:
        return blob

    def seal_blob_into(self, blob: bytes | memoryview, cid: bytes, out: memoryview) -> None:
        out[:] = memoryview(blob).cast("B")

    def open_blob(self, sealed: bytes | memoryview, cid: bytes, where: str) -> bytes | memoryview:
        return sealed

    def seal_table(self, table: bytes, header: bytes) -> bytes:
        return table

    def open_table(self, sealed: bytes, header: bytes, where: str) -> bytes:
        return sealed

    def seal_record(self, payload: bytes | memoryview, head: bytes) -> bytes | memoryview:
        return payload

    def open_record(
        self, sealed: bytes | memoryview, head: bytes, where: str
    ) -> bytes | memoryview:
        return sealed

    def seal_doc(self, raw: bytes, kind: str) -> bytes:
        return raw

    def open_doc(self, raw: bytes, kind: str, where: str) -> bytes:
        return raw

    def parquet_encryption(self) -> None:
        return None

    def parquet_decryption(self) -> None:
        return None


PLAIN = PlainSealer()
