"""DuckDB views over the repository's files, read in place (no copy, no import step).

Only committed recovery points are visible: the points view is built from the committed point
documents, and manifests are reached only through their roots.

Views: points, manifests (point_id, offset, length, chunk_id: the data chunks of every point;
zero regions are the gaps), chunks (the index), packs.
"""

from __future__ import annotations

import itertools

import duckdb
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs

from catalog.errors import CombError, QueryError
from catalog.store.index import INDEX_SCHEMA, segment_names
from catalog.store.leaves import LEAVES_PREFIX
from catalog.store.manifest import LEAF_SCHEMA, ROOT_SCHEMA, roots_name
from catalog.store.parquet_io import verified_path
from catalog.store.points import RecoveryPoint
from catalog.store.sealing import Sealer
from catalog.store.storage import Storage

POINT_COLUMNS = [
    ("id", pa.string()),
    ("source", pa.string()),
    ("source_path", pa.string()),
    ("time", pa.timestamp("us", tz="UTC")),
    ("size", pa.int64()),
    ("chunk_size", pa.int64()),
    ("leaf_chunks", pa.int64()),
    ("parent", pa.string()),
    ("mode", pa.string()),
    ("engine", pa.string()),
    ("root", pa.string()),
    ("leaves", pa.string()),
    ("read_on", pa.list_(pa.struct([("node_id", pa.string()), ("address", pa.string())]))),
]
STAT_COLUMNS = [
    "bytes_read",
    "bytes_new",
    "bytes_stored",
    "bytes_zero",
    "chunks",
    "chunks_new",
    "leaves_new",
    "leaves_shared",
    "metadata_bytes",
]


def points_table(points: list[RecoveryPoint]) -> pa.Table:
    from datetime import datetime

    cols: dict[str, list] = {name: [] for name, _ in POINT_COLUMNS}
    stats: dict[str, list] = {name: [] for name in [*STAT_COLUMNS, "seconds"]}
    for p in points:  # (attributes, not ``asdict``: its deep copies cost 0.3 s per 1,000)
        for name, _ in POINT_COLUMNS:
            value = getattr(p, name)
            if name == "time":
                value = datetime.fromisoformat(value)
            elif name == "read_on":
                value = list(value)
            cols[name].append(value)
        for name in stats:
            stats[name].append(getattr(p.stats, name))
    arrays = [pa.array(cols[n], t) for n, t in POINT_COLUMNS]
    arrays += [pa.array(stats[n], pa.int64()) for n in STAT_COLUMNS]
    arrays.append(pa.array(stats["seconds"], pa.float64()))
    names = [n for n, _ in POINT_COLUMNS] + STAT_COLUMNS + ["seconds"]
    return pa.table(arrays, names=names)


def _files(storage: Storage, names: list[str], damaged: list[str]) -> list[str]:
    """Local paths of the metadata files that match their BLAKE3 names. DuckDB would read a
    damaged file without complaint (seen: flipped footer bytes, plausible rows), so damaged
    files are left out of the views and reported instead."""
    out = []
    for name in names:
        try:
            out.append(verified_path(storage, name))  # (object storage: a local copy)
        except CombError as err:
            damaged.append(err.message)
    return out


_datasets = itertools.count()


def parquet_from(
    con: duckdb.DuckDBPyConnection,
    files: list[str],
    schema: pa.Schema,
    sealer: Sealer,
    with_filename: bool = False,
) -> str:
    """A FROM item over the (non-empty) Parquet files: DuckDB's own reader in a plain
    repository; in an encrypted one a pyarrow dataset that decrypts them, registered in ``con``.
    DuckDB 2.0.1 can read pyarrow's encrypted Parquet itself (PRAGMA add_parquet_key), but fails
    with "Computed AES tag differs" on column chunks of more than one page and on any pushed-down
    filter, so it is not used (README, "Known limits")."""
    listing = ", ".join("'" + f.replace("'", "''") + "'" for f in files)
    if not sealer.encrypted:
        option = ", filename = true" if with_filename else ""
        return f"read_parquet([{listing}]{option}, union_by_name = true)"
    name = f"_sealed_{next(_datasets)}"
    con.register(name, sealed_dataset(sealer, files, schema, with_filename))
    return name


def sealed_dataset(
    sealer: Sealer,
    files: list[str],
    schema: pa.Schema,
    with_filename: bool,
    pos: list[int] | None = None,
) -> ds.Dataset:
    """Encrypted Parquet files as one pyarrow dataset that decrypts them (page checksums
    verified), with the given columns (missing ones read as nulls, others ignored) and, when
    asked, a ``filename`` column, or a ``pos`` column of one given integer per file. DuckDB
    scans it with projection and filter pushdown."""
    fmt = ds.ParquetFileFormat(
        default_fragment_scan_options=ds.ParquetFragmentScanOptions(
            decryption_properties=sealer.parquet_decryption(), page_checksum_verification=True
        )
    )
    parts = None
    if with_filename:
        schema = schema.append(pa.field("filename", pa.string()))
        parts = [ds.field("filename") == f for f in files]
    elif pos is not None:
        schema = schema.append(pa.field("pos", pa.int64()))
        parts = [ds.field("pos") == p for p in pos]
    return ds.FileSystemDataset.from_paths(
        files, schema=schema, format=fmt, filesystem=pafs.LocalFileSystem(), partitions=parts
    )


def _parquet_or_empty(
    con: duckdb.DuckDBPyConnection,
    files: list[str],
    schema: pa.Schema,
    sealer: Sealer,
    with_filename: bool = False,
) -> str:
    """A SELECT of the schema's columns over the files, typed and empty when there are none."""
    if not files:
        cols = [f'NULL::{_duck_type(f.type)} AS "{f.name}"' for f in schema]
        if with_filename:
            cols.append("NULL::VARCHAR AS filename")
        return f"SELECT {', '.join(cols)} WHERE false"
    # Only the known columns (a later compat feature may add some): union_by_name lets files
    # with extra columns sit next to files without them.
    names = [f'"{f.name}"' for f in schema] + (["filename"] if with_filename else [])
    return (
        f"SELECT {', '.join(names)} FROM {parquet_from(con, files, schema, sealer, with_filename)}"
    )


def _duck_type(t: pa.DataType) -> str:
    return {
        pa.int8(): "TINYINT",
        pa.int16(): "SMALLINT",
        pa.int32(): "INTEGER",
        pa.int64(): "BIGINT",
        pa.string(): "VARCHAR",
    }.get(t, "BLOB")


def connect(
    storage: Storage,
    points: list[RecoveryPoint],
    damaged: list[str] | None = None,
    files: bool = True,
) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with the catalog views defined; messages about damaged files that
    the views leave out are appended to ``damaged``. Without ``files`` only ``points`` is
    defined, and ``add_file_views`` adds the others when a query needs them (they check every
    metadata file of the repository, which a report reading point documents must not pay)."""
    con = duckdb.connect(":memory:")
    con.register("points_arrow", points_table(points))
    con.execute("CREATE VIEW points AS SELECT * FROM points_arrow")
    if files:
        add_file_views(con, storage, points, damaged)
    _lock_down(con, storage)
    return con


FILE_VIEWS = ("manifests", "chunks", "packs")


def add_file_views(
    con: duckdb.DuckDBPyConnection,
    storage: Storage,
    points: list[RecoveryPoint],
    damaged: list[str] | None = None,
) -> None:
    """The views over the repository's Parquet files: manifests, chunks, packs."""
    damaged = [] if damaged is None else damaged
    # Two points with identical manifests share one root file: list it once.
    roots = _files(storage, sorted({roots_name(p.root) for p in points}), damaged)
    leaf_names = [n for n in storage.list(LEAVES_PREFIX) if n.endswith(".parquet")]
    leaves = _files(storage, leaf_names, damaged)
    index = _files(storage, segment_names(storage), damaged)
    file_id = "regexp_extract(filename, '([0-9a-f]{64})\\.parquet$', 1)"
    roots_sql = _parquet_or_empty(con, roots, ROOT_SCHEMA, storage.sealer, with_filename=True)
    leaves_sql = _parquet_or_empty(con, leaves, LEAF_SCHEMA, storage.sealer, with_filename=True)
    con.execute(
        f"CREATE VIEW _roots AS SELECT {file_id} AS root_id, leaf_no, leaf_file, leaf "
        f"FROM ({roots_sql})"
    )
    con.execute(
        f"CREATE VIEW _leaves AS SELECT {file_id} AS leaf_file, leaf, slot, chunk_id "
        f"FROM ({leaves_sql})"
    )
    con.execute(
        "CREATE VIEW manifests AS SELECT p.id AS point_id, "
        "(r.leaf_no * p.leaf_chunks + l.slot) * p.chunk_size AS offset, "
        "least(p.chunk_size, "
        "p.size - (r.leaf_no * p.leaf_chunks + l.slot) * p.chunk_size) AS length, "
        "l.chunk_id, (r.leaf_file IS NOT NULL) AS shared_leaf "
        "FROM points p JOIN _roots r ON r.root_id = p.root "
        "JOIN _leaves l ON l.leaf_file = coalesce(r.leaf_file, p.leaves) AND l.leaf = r.leaf"
    )
    con.execute(
        f"CREATE VIEW chunks AS {_parquet_or_empty(con, index, INDEX_SCHEMA, storage.sealer)}"
    )
    con.execute(
        "CREATE VIEW packs AS SELECT pack, count(*) AS chunks, sum(stored_len) AS stored_bytes, "
        "sum(raw_len) AS raw_bytes FROM chunks GROUP BY pack"
    )


def _lock_down(con: duckdb.DuckDBPyConnection, storage: Storage) -> None:
    """Queries are read-only and see only the repository: no other file, no extension
    downloads, and no way to change these settings back."""
    root = storage.local_copies()
    con.execute("SET allowed_directories = [?]", [root.rstrip("/") + "/"])
    for setting in (
        # Periods (date_trunc) and printed times are UTC, whatever the machine's zone.
        "TimeZone = 'UTC'",
        "enable_external_access = false",
        "autoinstall_known_extensions = false",
        "autoload_known_extensions = false",
        "lock_configuration = true",
    ):
        con.execute(f"SET {setting}")


# Only plain queries: EXPLAIN ANALYZE would execute (and so write) whatever it explains.
READ_ONLY_TYPES = {"SELECT"}


def _checked(sql: str) -> None:
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as err:
        raise QueryError(f"bad SQL: {str(err).splitlines()[0]}") from None
    if len(statements) != 1:
        raise QueryError(f"give exactly one statement ({len(statements)} found)")
    kind = statements[0].type.name
    if kind not in READ_ONLY_TYPES:
        raise QueryError(f"only read-only queries are allowed ({kind} refused)")


def stream_query(
    con: duckdb.DuckDBPyConnection, sql: str, batch_rows: int = 65536
) -> pa.RecordBatchReader:
    """Run one read-only query; its result streams in batches (memory stays bounded)."""
    _checked(sql)
    try:
        rel = con.sql(sql)
        if rel is None:
            return pa.RecordBatchReader.from_batches(pa.schema([]), [])
        return rel.to_arrow_reader(batch_rows)
    except duckdb.Error as err:
        raise QueryError(f"query failed: {str(err).splitlines()[0]}") from None


def run_query(con: duckdb.DuckDBPyConnection, sql: str) -> pa.Table:
    """Run one read-only query; anything that would write is refused."""
    reader = stream_query(con, sql)
    try:
        return reader.read_all()
    except (duckdb.Error, pa.ArrowException) as err:
        raise QueryError(f"query failed: {str(err).splitlines()[0]}") from None
