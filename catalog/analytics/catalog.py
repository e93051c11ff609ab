"""The analytics catalog: DuckDB views over the repository plus the history-derived tables that
named reports and ad-hoc queries share.

Views (documented in ``SCHEMA`` and by ``comb catalog-schema``): the file views of
``catalog.analytics.views`` (points, manifests, chunks, packs) and
- ``sources``: one row per source;
- ``point_history``: one row per point in source order, with its statistics;
- ``stored_history``: what each backup stored that the repository still holds, one row per
  point, forgotten points included (what they stored that kept points still use);
- ``changes``: every change-table row with its point and the life of its content;
- ``point_usage``: per point new, changed, stored and unique bytes, dedup and compression ratios;
- ``extents``: per point the runs of data and of zeros over the whole disk (expands manifests:
  for ad-hoc questions about a few points, not for a whole history);
- ``files`` and ``file_changes``: the files inside the points (``file_views``).

The history-derived views read change tables, so they are built on first use only. Only committed
points are visible (everything starts from the committed point documents).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime

import duckdb
import numpy as np
import pyarrow as pa

from catalog.analytics import file_history
from catalog.analytics.file_views import add_file_changes_view, add_files_view
from catalog.analytics.history import History
from catalog.analytics.views import (
    FILE_VIEWS,
    add_file_views,
    connect,
    parquet_from,
    sealed_dataset,
)
from catalog.store.changes import CHANGES_SCHEMA
from catalog.store.points import RecoveryPoint, load_forgotten
from catalog.store.storage import Storage

# Data chunks from the manifests, and the gaps between them (and before the first) as zeros.
EXTENTS_VIEW = """
CREATE VIEW extents AS
WITH m AS (SELECT point_id, "offset", length, chunk_id FROM manifests),
gaps AS (
    SELECT m.point_id, m."offset" + m.length AS start,
        coalesce(lead(m."offset") OVER (PARTITION BY m.point_id ORDER BY m."offset"), p.size)
        AS stop
    FROM m JOIN points p ON p.id = m.point_id
    UNION ALL
    SELECT p.id, 0, coalesce(min(m."offset"), p.size)
    FROM points p LEFT JOIN m ON m.point_id = p.id GROUP BY p.id, p.size
)
SELECT point_id, "offset", length, chunk_id, 'data' AS kind FROM m
UNION ALL
SELECT point_id, start, stop - start, NULL, 'zero' FROM gaps WHERE stop > start
"""


@dataclass
class Catalog:
    """A connection with the catalog views, and the history behind the derived ones."""

    con: duckdb.DuckDBPyConnection
    history: History
    damaged: list[str]
    storage: Storage
    points: list[RecoveryPoint]
    _built: set[str] = field(default_factory=set)
    forgotten_note: str | None = None

    @classmethod
    def open(cls, storage: Storage, points: list[RecoveryPoint]) -> Catalog:
        damaged: list[str] = []
        con = connect(storage, points, damaged, files=False)
        forgotten, bad = load_forgotten(storage, points)
        damaged += [f"forgotten point: {msg}" for msg in bad]
        history = History.of(storage, points, forgotten)
        cat = cls(con, history, damaged, storage, points)
        cat._register_points()
        return cat

    def incomplete_sources(self) -> list[str]:
        h = self.history
        return [s for s, ok in zip(h.sources, h.complete.tolist(), strict=True) if not ok]

    def need(self, sql: str) -> None:
        """Build the history-derived views an SQL text mentions (reading change tables)."""
        words = set(re.findall(r"[a-z_]+", sql.lower()))
        if words & {*FILE_VIEWS, "extents"} and "files" not in self._built:
            add_file_views(self.con, self.storage, self.points, self.damaged)
            self.con.execute(EXTENTS_VIEW)
            self._built.add("files")
        if "files" in words and "file_catalog" not in self._built:
            add_files_view(self.con, self.storage, self.points, self.damaged)
            self._built.add("file_catalog")
        if "file_changes" in words and "file_history" not in self._built:
            got = file_history.load(self.storage)
            self.damaged += got.problems
            add_file_changes_view(self.con, got)
            self._built.add("file_history")
        if words & {"sources", "stored_history"}:
            self._register_stored()
        if words & {"changes", "point_usage"}:
            self.need_changes()
        if "point_usage" in words:
            self._register_usage()

    def _register_points(self) -> None:
        h = self.history
        pts = h.points
        table = pa.table(
            {
                "pos": pa.array(np.arange(len(pts), dtype=np.int64)),
                "point_id": pa.array([p.id for p in pts], pa.string()),
                "source": pa.array([p.source for p in pts], pa.string()),
                "lane": pa.array([h.lanes[k].name for k in h.lane_of.tolist()], pa.string()),
                "seq": pa.array(h.seq.astype(np.int64)),
                "time": pa.array(h.times(), pa.timestamp("us", tz="UTC")),
                "size": pa.array([p.size for p in pts], pa.int64()),
                "chunk_size": pa.array([p.chunk_size for p in pts], pa.int64()),
                "mode": pa.array([p.mode for p in pts], pa.string()),
                "engine": pa.array([p.engine for p in pts], pa.string()),
                "seconds": pa.array([p.stats.seconds for p in pts], pa.float64()),
                "bytes_read": pa.array([p.stats.bytes_read for p in pts], pa.int64()),
                "bytes_new": pa.array([p.stats.bytes_new for p in pts], pa.int64()),
                "bytes_stored": pa.array([p.stats.bytes_stored for p in pts], pa.int64()),
                "bytes_zero": pa.array([p.stats.bytes_zero for p in pts], pa.int64()),
                "bytes_changed": _known([p.stats.bytes_changed for p in pts], pts),
                "bytes_data": _known([p.stats.bytes_data for p in pts], pts),
                "has_changes": pa.array([p.changes is not None for p in pts], pa.bool_()),
            }
        )
        self.con.register("_point_history", table)
        self.con.execute("CREATE VIEW point_history AS SELECT * FROM _point_history")

    def _register_stored(self) -> None:
        """``stored_history`` and ``sources``: stored bytes as the repository holds them now.
        A forgotten point's row counts what it stored that kept points still hold (its raw
        bytes in proportion); without exact lives (an incomplete chain) forgotten points are
        left out, with a note (``forgotten_note``)."""
        if "stored" in self._built:
            return
        h = self.history
        held = h.held_stored()
        pts = h.chain_points
        gone = h.gone
        # (point, stored bytes still held, live): without exact figures, live points only.
        kept = held.tolist() if held is not None else [0] * len(pts)
        rows = [
            (p, int(n), not g)
            for p, n, g in zip(pts, kept, gone.tolist(), strict=True)
            if not g or n > 0
        ]
        self.con.register(
            "_stored_rows",
            pa.table(
                {
                    "point_id": pa.array([p.id for p, _, _ in rows], pa.string()),
                    "source": pa.array([p.source for p, _, _ in rows], pa.string()),
                    "time": pa.array(
                        [datetime.fromisoformat(p.time) for p, _, _ in rows],
                        pa.timestamp("us", tz="UTC"),
                    ),
                    "live": pa.array([live for _, _, live in rows], pa.bool_()),
                    "bytes_stored": pa.array(
                        [p.stats.bytes_stored if live else n for p, n, live in rows], pa.int64()
                    ),
                    "bytes_new": pa.array(
                        [
                            p.stats.bytes_new
                            if live
                            else p.stats.bytes_new * n // max(1, p.stats.bytes_stored)
                            for p, n, live in rows
                        ],
                        pa.int64(),
                    ),
                    "has_changes": pa.array([p.changes is not None for p, _, _ in rows]),
                }
            ),
        )
        self.con.execute(
            "CREATE VIEW stored_history AS SELECT s.point_id, s.source, s.time, s.live, "
            "h.pos, s.bytes_stored, s.bytes_new, h.bytes_data, s.has_changes, "
            "row_number() OVER (ORDER BY s.time, s.point_id) AS ord "
            "FROM _stored_rows s LEFT JOIN _point_history h USING (point_id)"
        )
        self.con.execute(
            "CREATE VIEW sources AS SELECT source, count(*) AS points, min(time) AS first_time, "
            "max(time) AS last_time, arg_max(size, pos) AS size, "
            "arg_max(bytes_data, pos) AS bytes_data, (SELECT sum(bytes_stored) FROM "
            "stored_history s WHERE s.source = h.source)::BIGINT AS bytes_stored, "
            "bool_and(has_changes) AS has_changes FROM point_history h GROUP BY source"
        )
        self._built.add("stored")
        if held is None and gone.any():
            self.forgotten_note = (
                "forgotten points of sources with an incomplete chain are left out of stored "
                "bytes: what they stored that kept points still use is not counted"
            )

    def need_changes(self) -> None:
        """Build the ``changes`` view: DuckDB reads the (checked) change tables in place."""
        if "changes" in self._built:
            return
        files = self.history.change_files()
        if self.storage.sealer.encrypted and files:
            # Encrypted: a pyarrow dataset that decrypts the change tables, each file's
            # position given as a partition value (a string join on file names is 20x slower).
            self.con.register(
                "_changes_sealed",
                sealed_dataset(
                    self.storage.sealer,
                    [f[1] for f in files],
                    CHANGES_SCHEMA,
                    False,
                    [f[0] for f in files],
                ),
            )
            self.con.execute(
                'CREATE VIEW _changes AS SELECT pos, "offset", chunk_key, new, stored_len '
                "FROM _changes_sealed"
            )
            self._create_changes_view()
            return
        self.con.register(
            "_change_files",
            pa.table(
                {
                    "filename": pa.array([f[1] for f in files], pa.string()),
                    "pos": pa.array([f[0] for f in files], pa.int64()),
                }
            ),
        )
        source = (
            parquet_from(
                self.con,
                [f[1] for f in files],
                CHANGES_SCHEMA,
                self.storage.sealer,
                with_filename=True,
            )
            if files
            else '(SELECT NULL::VARCHAR AS filename, NULL::BIGINT AS "offset", '
            "NULL::BIGINT AS chunk_key, NULL::BOOLEAN AS new, NULL::INTEGER AS stored_len "
            "WHERE false)"
        )
        self.con.execute(
            'CREATE VIEW _changes AS SELECT f.pos, c."offset", c.chunk_key, c.new, '
            f"c.stored_len FROM {source} c JOIN _change_files f USING (filename)"
        )
        self._create_changes_view()

    def _create_changes_view(self) -> None:
        self.con.execute(
            'CREATE VIEW changes AS SELECT h.point_id, h.source, c.pos, c."offset", '
            'least(h.chunk_size, h.size - c."offset") AS length, c.chunk_key, '
            "c.chunk_key IS NULL AS zero, c.new, c.stored_len "
            "FROM _changes c JOIN _point_history h ON h.pos = c.pos"
        )
        self._built.add("changes")

    def unique_bytes(self) -> np.ndarray:
        """Per point (position): stored bytes of the chunks no other point holds, i.e. what
        deleting only that point would free."""
        return self.history.lone_bytes()

    def freed(self, delete: np.ndarray) -> dict[str, int]:
        """Per source name: stored bytes freed by deleting the points marked in ``delete``
        (bool per position), attributed to the source whose backup stored each chunk (which
        may be a source all of whose points were forgotten before)."""
        out: dict[str, int] = {}
        by_pos = self.history.freed_by(delete)
        for p, n in zip(self.history.chain_points, by_pos.tolist(), strict=True):
            out[p.source] = out.get(p.source, 0) + int(n)
        return out

    def _register_usage(self) -> None:
        if "point_usage" in self._built:
            return
        unique = self.unique_bytes()
        complete = self.history.complete[self.history.source_of]
        self.con.register(
            "_unique",
            pa.table(
                {
                    "pos": pa.array(np.arange(len(unique), dtype=np.int64)),
                    "unique_bytes": pa.array(unique, mask=~complete),
                }
            ),
        )
        self.con.execute(
            "CREATE VIEW point_usage AS SELECT h.pos, h.point_id, h.source, h.time, "
            "h.bytes_new AS new_bytes, h.bytes_changed AS changed_bytes, "
            "h.bytes_stored AS stored_bytes, u.unique_bytes, h.bytes_data AS data_bytes, "
            "CASE WHEN h.bytes_new > 0 THEN (h.bytes_read - h.bytes_zero) / h.bytes_new END "
            "AS dedup_ratio, "
            "CASE WHEN h.bytes_stored > 0 THEN h.bytes_new / h.bytes_stored END "
            "AS compression_ratio FROM _point_history h JOIN _unique u ON u.pos = h.pos"
        )
        self._built.add("point_usage")


def _known(values: list[int], points: list[RecoveryPoint]) -> pa.Array:
    """Statistics that exist only with a change table: null for points made before them."""
    return pa.array(values, pa.int64(), mask=np.array([p.changes is None for p in points], bool))
