"""DuckDB views over the file catalogs (``catalog.store.filecat``): ``files`` (one row per entry
per point) and ``file_changes`` (one row per entry added, modified or removed by a point).

``file_changes`` is the catalogs' change rows as they are stored, forgotten points' included
(``forgotten`` says so: a file a kept point still holds may have been added by one), from
``catalog.analytics.file_history`` (one table, cached locally): questions about history ("every
version of /etc/fstab", "what changed this week") read only them. ``files`` rebuilds each
point's whole listing from the nearest full listing up its chain and the change rows after it
(``_file_lineage`` says which file serves which point at which rank): a query about a few
points or paths is cheap, one over every point of a long history reads points × entries rows.

Owns these views. Must not: write, or read a filesystem.
"""

from __future__ import annotations

import duckdb
import pyarrow as pa

from catalog.analytics.file_history import FileHistory
from catalog.analytics.views import sealed_dataset
from catalog.errors import CombError
from catalog.store import filecat
from catalog.store.parquet_io import verified_path
from catalog.store.points import RecoveryPoint
from catalog.store.storage import Storage

_ENTRY = ", ".join(
    f'r."{f.name}"' for f in filecat.ENTRY_FIELDS if f.name not in filecat.WHERE_FROM
)
_TIME = "make_timestamp(r.mtime_ns // 1000) AS mtime"

FILES_VIEW = f"""
CREATE VIEW files AS
SELECT * EXCLUDE (rank, change) FROM (
    SELECT * FROM (
        SELECT l.point_id, l.rank, {_ENTRY}, {_TIME}, NULL::VARCHAR AS change
        FROM _file_lineage l JOIN _file_full r USING (pos)
        UNION ALL
        SELECT l.point_id, l.rank, {_ENTRY}, {_TIME}, r.change
        FROM _file_lineage l JOIN _file_changes r USING (pos)
    )
    QUALIFY row_number() OVER (PARTITION BY point_id, volume, path ORDER BY rank) = 1
) WHERE change IS DISTINCT FROM 'removed'
"""
FILE_CHANGES_VIEW = f"""
CREATE VIEW file_changes AS
SELECT m.point_id, m.source, m.time, m.forgotten, r.change, {_ENTRY}, {_TIME}
FROM _file_history r JOIN _file_history_points m USING (point_id)
"""


class _Files:
    """The catalog files to register, each with a position, and which point reads which."""

    def __init__(self, storage: Storage, damaged: list[str]) -> None:
        self.storage = storage
        self.damaged = damaged
        self.docs: dict[str, filecat.FilesDoc | None] = {}
        self.paths: dict[str, list[tuple[int, str]]] = {"full": [], "changes": []}
        self.pos: dict[str, int] = {}

    def doc(self, point_id: str) -> filecat.FilesDoc | None:
        if point_id not in self.docs:
            try:
                self.docs[point_id] = filecat.read_doc(self.storage, point_id)
            except CombError as err:
                self.damaged.append(err.message)
                self.docs[point_id] = None
        return self.docs[point_id]

    def position(self, kind: str, file_id: str) -> int | None:
        """The position of a data file, checked against its name (None: damaged, said)."""
        if file_id not in self.pos:
            name = filecat.data_name(file_id)
            try:
                path = verified_path(self.storage, name)  # (object storage: a local copy)
            except CombError as err:
                self.damaged.append(err.message)
                return None
            self.pos[file_id] = len(self.pos)
            self.paths[kind].append((self.pos[file_id], path))
        return self.pos[file_id]

    def lineage(self, point_id: str) -> list[tuple[int, int]] | None:
        """(position, rank) of the files that make up a point's listing."""
        out: list[tuple[int, int]] = []
        doc = self.doc(point_id)
        while doc is not None and len(out) <= filecat.FULL_EVERY + 1:
            kind, file_id = ("full", doc.full) if doc.full else ("changes", doc.changes)
            pos = self.position(kind, file_id)
            if pos is None:
                return None
            out.append((pos, len(out)))
            if doc.full:
                return out
            doc = self.doc(doc.base) if doc.base else None
        self.damaged.append(f"{filecat.doc_name(point_id)}: its chain has no full listing")
        return None


def _dataset(paths: list[tuple[int, str]], schema: pa.Schema, storage: Storage) -> object:
    if not paths:
        return schema.empty_table().append_column("pos", pa.array([], pa.int64()))
    return sealed_dataset(
        storage.sealer, [p for _, p in paths], schema, False, [pos for pos, _ in paths]
    )


def add_files_view(
    con: duckdb.DuckDBPyConnection,
    storage: Storage,
    points: list[RecoveryPoint],
    damaged: list[str],
) -> None:
    """The ``files`` view: each live point's listing, from its chain's files."""
    files = _Files(storage, damaged)
    have = filecat.cataloged(storage)
    lineage: dict[str, list] = {"point_id": [], "pos": [], "rank": []}
    for point in points:
        chain = files.lineage(point.id) if point.id in have else None
        for at, rank in chain or []:
            lineage["point_id"].append(point.id)
            lineage["pos"].append(at)
            lineage["rank"].append(rank)
    con.register("_file_lineage", pa.table(lineage, schema=_LINEAGE))
    con.register("_file_full", _dataset(files.paths["full"], filecat.LISTING_SCHEMA, storage))
    con.register("_file_changes", _dataset(files.paths["changes"], filecat.CHANGES_SCHEMA, storage))
    con.execute(FILES_VIEW)


def add_file_changes_view(con: duckdb.DuckDBPyConnection, history: FileHistory) -> None:
    """The ``file_changes`` view over a ``FileHistory`` (and ``_file_history_points``: every
    live and forgotten point's id, source, time and ``forgotten``)."""
    con.register("_file_history", history.rows)
    con.register("_file_history_points", history.points)
    con.execute(FILE_CHANGES_VIEW)


_LINEAGE = pa.schema([("point_id", pa.string()), ("pos", pa.int64()), ("rank", pa.int64())])
