"""File catalogs: the files inside each recovery point's filesystems, as Parquet (FORMAT.md 23).

A point's catalog is a document ``files/<point id>.json`` (sealed like a point document) naming
Parquet files of rows, one row per entry (volume, path, kind, size, mode, owner, times, inode,
link count, link target). It is stored as a change: ``changes`` holds only the entries added,
modified or removed since its ``base`` (the catalog of the point the backup read as parent),
each row marked ``added``/``modified``/``removed``; a catalog without a base, and every
``FULL_EVERY``-th one of a chain, also has ``full``: every entry. A point's whole listing is
the nearest ``full`` up its chain plus the changes after it, so reading one costs at most
``FULL_EVERY`` small files, whatever the history's length. Every folder's row says which disk
chunks its listing came from (``deps``) and the byte ranges in them (``spans``); ``touched``
is the chunks' union (empty: some are unknown). When none of them changed, the next point's
listing is the same and nothing is walked; otherwise only the folders whose bytes changed are
listed again.

Owns the catalog's files, their schema, the change computation and rebuilding a point's
listing. Must not: read a filesystem (``drive.files`` does), or know about points' content.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from catalog.errors import CombError, CorruptionError, RepositoryError
from catalog.store import sorted_rows
from catalog.store.parquet_io import ParquetStreamWriter, read_parquet
from catalog.store.storage import Storage, json_ids

FILES_PREFIX = "files"
FILES_DOC_KIND = "files"  # associated data of a sealed catalog document
FILES_FORMAT = "comb-files"
FILES_VERSION = 1
FULL_EVERY = 32

ENTRY_FIELDS = [
    pa.field("volume", pa.string(), nullable=False),
    pa.field("path", pa.binary(), nullable=False),  # below the volume, from "/"; raw bytes
    pa.field("path_text", pa.string(), nullable=False),  # as shown: non-UTF-8 bytes escaped
    pa.field("kind", pa.string(), nullable=False),
    pa.field("size", pa.int64(), nullable=False),
    pa.field("mode", pa.int32(), nullable=False),
    pa.field("uid", pa.int64(), nullable=False),
    pa.field("gid", pa.int64(), nullable=False),
    pa.field("mtime_ns", pa.int64(), nullable=False),
    pa.field("ctime_ns", pa.int64(), nullable=False),
    pa.field("inode", pa.uint64(), nullable=False),
    pa.field("nlink", pa.int32(), nullable=False),
    pa.field("target", pa.binary(), nullable=True),
    # A folder's: the disk chunks (offsets, int64 little-endian, ascending) its listing was
    # read from; null: unknown (an incremental catalog lists it again).
    pa.field("deps", pa.binary(), nullable=True),
    # A folder's: the disk byte ranges themselves (offset, length pairs, int64 little-endian,
    # ascending); null: unknown, or a catalog from before they were kept (``deps`` only).
    pa.field("spans", pa.binary(), nullable=True),
]
# Columns kept for the next incremental catalog, not facts about an entry.
WHERE_FROM = ("deps", "spans")
LISTING_SCHEMA = pa.schema(ENTRY_FIELDS)
CHANGES_SCHEMA = pa.schema([*ENTRY_FIELDS, pa.field("change", pa.string(), nullable=False)])
KEY = ["volume", "path"]
# What makes an entry "modified": any of these differs (content is judged by size and times).
COMPARED = ["kind", "size", "mode", "uid", "gid", "mtime_ns", "ctime_ns", "inode", "nlink"]
COMPARED += ["target"]
# A row whose only difference is where it came from (``WHERE_FROM``: the folder's listing
# comes from other bytes) is stored as ``located``: the catalog needs it, a person would not
# call it a change.
LOCATED = "located"


@dataclass
class FilesDoc:
    """One point's catalog document."""

    point: str
    base: str | None
    depth: int  # catalogs since the last one with ``full`` (0: this one has it)
    changes: str  # Parquet file id under files/
    full: str | None
    entries: int
    added: int
    modified: int
    removed: int
    chunk_size: int
    touched: list[int] = field(default_factory=list)  # chunk offsets the listing came from
    volumes: list[dict[str, object]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # what the walk could not read

    def to_json(self) -> bytes:
        doc = {"format": FILES_FORMAT, "version": FILES_VERSION, **asdict(self)}
        return json.dumps(doc, sort_keys=True).encode()


def doc_name(point_id: str) -> str:
    return f"{FILES_PREFIX}/{point_id}.json"


def data_name(file_id: str) -> str:
    return f"{FILES_PREFIX}/{file_id}.parquet"


def cataloged(storage: Storage) -> set[str]:
    """The ids of the points that have a catalog."""
    return json_ids(storage, FILES_PREFIX)


class Survey(NamedTuple):
    """The file catalogs of a repository as ``survey`` found them."""

    docs: list[FilesDoc]  # every document that reads
    named: set[str]  # the data files they name (storage names)
    problems: list[str]  # a line for each document that does not read or lost its base
    unread: int  # documents that do not read: the files they name are not known


def survey(storage: Storage) -> Survey:
    """Every catalog document, read."""
    docs: list[FilesDoc] = []
    problems: list[str] = []
    for point_id in sorted(cataloged(storage)):
        try:
            doc = read_doc(storage, point_id)
        except CombError as err:
            problems.append(err.message)
            continue
        if doc is not None:
            docs.append(doc)
    unread = len(problems)
    ids = {d.point for d in docs}
    for doc in docs:
        if doc.base is not None and doc.base not in ids:
            problems.append(f"{doc_name(doc.point)}: its base's catalog is missing")
    named = {data_name(i) for d in docs for i in (d.changes, d.full) if i}
    return Survey(docs, named, problems, unread)


def read_doc(storage: Storage, point_id: str) -> FilesDoc | None:
    """A point's catalog document, None without one (one request on object storage)."""
    name = doc_name(point_id)
    try:
        stored = storage.read(name)
    except RepositoryError:  # "cannot read ...": unless there is no such document
        if not storage.exists(name):
            return None
        raise
    where = storage.local_path(name) or name
    raw = storage.sealer.open_doc(stored, FILES_DOC_KIND, where)
    try:
        doc = json.loads(raw)
        if doc.get("format") != FILES_FORMAT or doc.get("version") != FILES_VERSION:
            raise ValueError("not a file catalog document of a known version")
        del doc["format"], doc["version"]
        return FilesDoc(**doc)
    except (ValueError, TypeError, AttributeError) as err:
        raise CorruptionError(f"{where}: {err}") from None


def _write(storage: Storage, schema: pa.Schema, table: pa.Table) -> str:
    writer = ParquetStreamWriter(storage, schema, row_group_rows=1 << 17)
    try:
        writer.write(table.select(schema.names).cast(schema))
        file_id, _ = writer.commit(FILES_PREFIX)
    except BaseException:
        writer.abort()
        raise
    return file_id


def sort_listing(table: pa.Table) -> pa.Table:
    """``table`` in the listing's columns, sorted by volume and path (checked first: listings
    are mostly made sorted, and a sort of a million paths costs more than the check)."""
    table = conform(table, LISTING_SCHEMA)
    if sorted_rows.is_sorted(table, KEY):
        return table
    return table.sort_by([("volume", "ascending"), ("path", "ascending")])


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` in ``schema``'s columns; a nullable column it lacks (``spans``, which older
    catalogs do not have) is all nulls."""
    for f in schema:
        if f.name not in table.column_names and f.nullable:
            table = table.append_column(f, pa.nulls(table.num_rows, f.type))
    return table.select(schema.names).cast(schema)


def keys_table(parts: list[pa.Table]) -> pa.Table:
    """Entry keys (``volume``, ``path``), one row each, from tables of them."""
    schema = pa.schema([ENTRY_FIELDS[0], ENTRY_FIELDS[1]])
    table = pa.concat_tables([t.select(KEY).cast(schema) for t in parts] or [schema.empty_table()])
    return table.group_by(KEY).aggregate([])


def diff(old: pa.Table, new: pa.Table, keys: pa.Table | None = None) -> pa.Table:
    """The change rows that take listing ``old`` to listing ``new`` (both as LISTING_SCHEMA);
    with ``keys`` (``keys_table``), only those entries can differ: the others are not compared."""
    if keys is not None:
        old, new = (t.join(keys, KEY, join_type="left semi") for t in (old, new))
    if not old.num_rows:  # a first catalog: every entry added
        added = pa.array(["added"] * new.num_rows, pa.string())
        return new.append_column("change", added).sort_by(
            [("volume", "ascending"), ("path", "ascending")]
        )
    old_k = old.append_column("_old", pa.array([True] * old.num_rows, pa.bool_()))
    joined = new.join(old_k, KEY, join_type="full outer", right_suffix="_was")
    gone = pc.is_null(joined.column("kind"))
    fresh = pc.is_null(joined.column("_old"))
    changed = _differ(joined, COMPARED)
    located = _differ(joined, list(WHERE_FROM))
    kind = pc.if_else(
        gone, "removed", pc.if_else(fresh, "added", pc.if_else(changed, "modified", LOCATED))
    )
    keep = pc.or_(pc.or_(gone, fresh), pc.or_(changed, located))
    out = {}
    for name in LISTING_SCHEMA.names:
        if name in KEY:
            out[name] = joined.column(name)
        else:  # a removed entry keeps what it was
            out[name] = pc.if_else(gone, joined.column(f"{name}_was"), joined.column(name))
    result = pa.table(out).append_column("change", kind).filter(keep)
    return result.sort_by([("volume", "ascending"), ("path", "ascending")])


def _differ(joined: pa.Table, names: list[str]) -> pa.ChunkedArray:
    """Rows where any of the columns differs from its ``_was`` twin (null against a value too)."""
    out = pa.chunked_array([pa.array([False] * joined.num_rows, pa.bool_())])
    for name in names:
        a, b = joined.column(name), joined.column(f"{name}_was")
        differs = pc.fill_null(pc.not_equal(a, b), False)
        out = pc.or_(out, pc.or_(differs, pc.xor(pc.is_null(a), pc.is_null(b))))
    return out


def apply(listing: pa.Table, changes: pa.Table) -> pa.Table:
    """``listing`` (sorted) with ``changes`` (one row per entry at most) applied, in one pass."""
    if not changes.num_rows:
        return listing
    mine = sorted_rows.keys(listing, KEY)
    gone = pc.is_in(mine, value_set=sorted_rows.keys(changes, KEY))
    present = changes.filter(pc.not_equal(changes.column("change"), "removed"))
    known = np.asarray(mine.to_numpy(zero_copy_only=False), dtype=object)
    keep = np.logical_not(gone.to_numpy(zero_copy_only=False))
    return sorted_rows.merge(listing, present, KEY, known, keep)


def _last_changes(tables: list[pa.Table]) -> pa.Table:
    """The change rows of consecutive catalogs (oldest first) as one: each entry's last."""
    steps = [
        t.append_column("_step", pa.array([i] * t.num_rows, pa.int32()))
        for i, t in enumerate(tables)
    ]
    rows = pa.concat_tables(steps).sort_by(
        [("volume", "ascending"), ("path", "ascending"), ("_step", "descending")]
    )
    k = sorted_rows.keys(rows, KEY)
    first = pa.concat_arrays(
        [pa.array([True] * min(len(k), 1), pa.bool_()), pc.not_equal(k[1:], k[:-1])]
    )
    return rows.filter(first).drop_columns(["_step"])


def read_listing(storage: Storage, point_id: str, doc: FilesDoc | None = None) -> pa.Table | None:
    """Every entry of a point's catalog (LISTING_SCHEMA, sorted); None without a catalog.
    ``doc``: its document, when the caller has read it already."""
    chain: list[FilesDoc] = []
    doc = doc if doc is not None else read_doc(storage, point_id)
    while doc is not None and doc.full is None:
        chain.append(doc)
        if doc.base is None or len(chain) > FULL_EVERY + 1:
            raise CorruptionError(f"{doc_name(doc.point)}: its chain has no full listing")
        doc = read_doc(storage, doc.base)
        if doc is None:
            raise CorruptionError(f"{doc_name(chain[-1].point)}: its base's catalog is missing")
    if doc is None:
        return None
    assert doc.full is not None
    listing = sort_listing(read_parquet(storage, data_name(doc.full)))
    if not chain:
        return listing
    changes = [
        conform(read_parquet(storage, data_name(step.changes)), CHANGES_SCHEMA)
        for step in reversed(chain)
    ]
    return apply(listing, _last_changes(changes))


def write_catalog(
    storage: Storage,
    point_id: str,
    listing: pa.Table,
    base: FilesDoc | None,
    base_listing: pa.Table | None,
    chunk_size: int,
    touched: list[int],
    volumes: list[dict[str, object]],
    skipped: list[str],
    keys: pa.Table | None = None,
) -> FilesDoc:
    """Commit a point's catalog: its changes against ``base`` (every entry "added" without
    one; only the entries of ``keys`` compared when given, see ``diff``), its full listing when
    the chain is due one, then the document (the commit)."""
    listing = sort_listing(listing)
    empty = LISTING_SCHEMA.empty_table()
    changes = diff(base_listing if base_listing is not None else empty, listing, keys)
    depth = 0 if base is None else base.depth + 1
    full = None
    if base is None or depth >= FULL_EVERY:
        depth = 0
        full = _write(storage, LISTING_SCHEMA, listing)
    counts = {k: 0 for k in ("added", "modified", "removed")}
    for value, n in zip(*pc.value_counts(changes.column("change")).flatten(), strict=True):
        if value.as_py() in counts:
            counts[value.as_py()] = n.as_py()
    doc = FilesDoc(
        point=point_id,
        base=base.point if base is not None else None,
        depth=depth,
        changes=_write(storage, CHANGES_SCHEMA, changes),
        full=full,
        entries=listing.num_rows,
        chunk_size=chunk_size,
        touched=sorted(touched),
        volumes=volumes,
        skipped=skipped,
        **counts,
    )
    storage.write_atomic(doc_name(point_id), storage.sealer.seal_doc(doc.to_json(), FILES_DOC_KIND))
    return doc
