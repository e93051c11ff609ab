"""The storage interface: all repository I/O goes through here, nothing else touches the disk.

A repository is a flat namespace of slash-separated names ("packs/ab/ab12...pack"). Files are
created through ``create()``, written sequentially, and become visible under their final name only
through ``NewFile.commit(name)`` (tmp + fsync + rename + fsync(dir)). Nothing is modified in
place but an overlay's log files and lock (``catalog.store.inplace``). Errors are one-line
``RepositoryError``s. ``catalog.store.local.LocalStorage`` is the local filesystem; object
storage implements the same Protocol next to it.

Owns the interface. Must not: hold an implementation (each storage is its own module).
"""

from __future__ import annotations

import builtins
from typing import Protocol

from catalog.store.inplace import InPlaceFiles
from catalog.store.sealing import Sealer

TMP_DIR = "tmp"


class NewFile(Protocol):
    """A file being written; invisible until committed under its final name."""

    def write(self, data: bytes | memoryview) -> int: ...
    def write_many(self, parts: list[bytes | memoryview]) -> int: ...
    def tell(self) -> int: ...
    def commit(self, name: str, durable: bool = True) -> None: ...
    def abort(self) -> None: ...


class Storage(InPlaceFiles, Protocol):
    """What the catalog needs from a place that keeps files (``InPlaceFiles``: for overlays)."""

    # What seals and opens its objects (catalog.store.sealing): plain or AES-256-GCM.
    sealer: Sealer

    def exists(self, name: str) -> bool: ...
    def size(self, name: str) -> int: ...
    def read(self, name: str, offset: int = 0, length: int = -1) -> bytes: ...
    def read_into(self, name: str, offset: int, buf: memoryview) -> int: ...
    def list(self, prefix: str) -> list[str]: ...
    def create(self, bulk: bool = False) -> NewFile: ...
    def write_atomic(self, name: str, data: bytes) -> None: ...
    def remove(self, name: str) -> None: ...
    def local_path(self, name: str) -> str | None: ...

    def local_copy(self, name: str) -> str:
        """A local file holding ``name``'s bytes, for readers that take a path (DuckDB, pyarrow
        datasets): the file itself in a local directory; on object storage a download kept in
        a local cache. Not checked here (``parquet_io.verified_path`` checks it)."""

    def local_copies(self) -> str:
        """The directory every ``local_copy`` lies under (queries may read there only)."""

    def tmp_files(self) -> builtins.list[str]:
        """Names in ``tmp/``: files being written or left by interrupted writes, sorted."""

    def mtime(self, name: str) -> float | None:
        """When ``name`` was last written (seconds since the epoch); None: it does not exist."""

    def age(self, name: str) -> float | None:
        """Seconds since ``name`` was last written, both instants by the storage's own clock
        (an object store's, not this machine's); None: it does not exist."""

    def list_dirs(self, prefix: str) -> builtins.list[str]:
        """The prefixes directly under ``prefix`` (``packs/ab``), sorted; a missing one has none."""

    def sync(self, prefix: str) -> None:
        """Make the removals directly under ``prefix`` durable (a missing prefix: none)."""

    def remove_dir(self, prefix: str) -> None:
        """Remove ``prefix`` once nothing is under it (an error while something is; a missing
        one is fine); durable with ``sync`` of its parent."""


def json_ids(storage: Storage, prefix: str) -> set[str]:
    """The ids of the JSON documents under ``prefix`` (``<prefix>/<id>.json``): points, keys,
    file catalogs."""
    return {
        n.rsplit("/", 1)[-1][: -len(".json")] for n in storage.list(prefix) if n.endswith(".json")
    }
