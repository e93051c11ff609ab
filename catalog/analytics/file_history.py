"""Every file catalog's change rows as one table, with each point's source and time: what
history questions about files (``comb find``, the ``file_changes`` view) read, kept in a local
cache so that a long history is not read again file by file.

A repository holds one catalog document and one change file per point (FORMAT.md 23), and a
point document per point: 1,000 points are 3,000 files to open, unseal and check, where the
rows themselves are a few MB. The cache holds those rows (``located`` ones left out: no reader
reports them) and each point's source and time, and is extended by the catalogs and points it
has not seen. Catalog documents and point documents are never rewritten (a point's id hashes its
document; a catalog document is written once, after its files), so a cached one stays valid
while its file is there with the size, time and inode number the cache saw; any other
difference makes comb read every catalog again. Live and forgotten points are told apart from
the names in ``points/`` and ``forgotten/`` at every use, never from the cache.

The cache is ``$COMB_CACHE_DIR/<repository id>/file-changes.bin`` (beside the lives cache of
``catalog.analytics.lives.cache``): a magic, the BLAKE3 of the rest, a JSON header and two
Arrow IPC streams (uncompressed: read in place, no decoding), sealed like a pack's entry table
with ``file-changes-cache`` as associated data in an encrypted repository (file names are the
guest's data). It is not part of the format: nothing in the
repository names it, it is replaced by rename, and deleting it loses nothing.

Owns the cache and the table. Must not: write the repository, print, or trust a cache that does
not check.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import struct
from dataclasses import dataclass, field
from datetime import datetime

import blake3
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from catalog.errors import CombError, CorruptionError
from catalog.store import filecat
from catalog.store.cachedir import cache_dir
from catalog.store.format import CONFIG_NAME, parse_config
from catalog.store.parquet_io import read_parquet
from catalog.store.points import FORGOTTEN_PREFIX, POINTS_PREFIX, parse_point
from catalog.store.storage import Storage, json_ids

CACHE_NAME = "file-changes.bin"
CACHE_KIND = b"file-changes-cache"  # associated data of a sealed cache
_MAGIC = b"COMBFHC1"
_VERSION = 1

ROW_SCHEMA = pa.schema(
    [
        pa.field("point_id", pa.string(), nullable=False),
        pa.field("change", pa.string(), nullable=False),
        *[f for f in filecat.ENTRY_FIELDS if f.name not in filecat.WHERE_FROM],
    ]
)
POINT_SCHEMA = pa.schema(
    [
        pa.field("point_id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("time", pa.timestamp("us", tz="UTC"), nullable=False),
    ]
)
_ROW_COLUMNS = [n for n in ROW_SCHEMA.names if n != "point_id"]
_CHANGE_SCHEMA = pa.schema([ROW_SCHEMA.field(n) for n in _ROW_COLUMNS])


@dataclass
class FileHistory:
    """The change rows of every catalog and the points they belong to."""

    rows: pa.Table  # ROW_SCHEMA: every catalog's change rows but ``located`` ones
    points: pa.Table  # POINT_SCHEMA + ``forgotten``: every live and forgotten point
    problems: list[str] = field(default_factory=list)  # catalogs left out, one line each
    point_problems: list[str] = field(default_factory=list)  # point documents left out
    read: int = 0  # catalogs read from the repository this time (0: all from the cache)


@dataclass
class _Cached:
    catalogs: dict[str, list[int]]  # point id -> the document's [size, mtime_ns, inode]
    rows: pa.Table
    points: pa.Table


def cache_path(repo_id: str) -> str:
    return os.path.join(cache_dir(), repo_id, CACHE_NAME)


def load(storage: Storage) -> FileHistory:
    """The history, from the cache where it is current, the rest from the repository (and the
    cache then extended). A damaged catalog or point document is a problem line, left out."""
    stamps = _stamps(storage)
    live = json_ids(storage, POINTS_PREFIX)
    forgotten = json_ids(storage, FORGOTTEN_PREFIX) - live
    repo_id = parse_config(storage.read(CONFIG_NAME), CONFIG_NAME).id
    path = cache_path(repo_id)
    cached = _read(path, storage)
    if cached is None or any(stamps.get(p) != s for p, s in cached.catalogs.items()):
        cached = _Cached({}, ROW_SCHEMA.empty_table(), POINT_SCHEMA.empty_table())
    problems: list[str] = []
    point_problems: list[str] = []
    new_rows, new_catalogs = _new_catalogs(storage, stamps, cached.catalogs, problems)
    known = set(cached.points.column("point_id").to_pylist())
    new_points = _new_points(storage, (live | forgotten) - known, live, point_problems)
    if new_catalogs or new_points.num_rows:
        cached = _Cached(
            {**cached.catalogs, **new_catalogs},
            _one_batch(pa.concat_tables([t for t in (cached.rows, new_rows) if t is not None])),
            _one_batch(pa.concat_tables([cached.points, new_points])),
        )
        _save(path, cached, storage)
    ids = cached.points.column("point_id")
    points = cached.points.filter(pc.is_in(ids, pa.array(sorted(live | forgotten), pa.string())))
    gone = pc.is_in(points.column("point_id"), pa.array(sorted(forgotten), pa.string()))
    points = points.append_column("forgotten", gone)
    return FileHistory(cached.rows, points, problems, point_problems, len(new_catalogs))


def _one_batch(table: pa.Table) -> pa.Table:
    """``table`` as one batch (each pass over it is then one call, not one per catalog), or as
    it is where one would pass 2 GiB of text in a column."""
    try:
        return table.combine_chunks()
    except (pa.ArrowInvalid, pa.ArrowCapacityError):
        return table


def _stamps(storage: Storage) -> dict[str, list[int]]:
    """Each catalog document's [size, mtime_ns, inode] (0 where the storage cannot say)."""
    out: dict[str, list[int]] = {}
    base = storage.local_path(filecat.FILES_PREFIX)
    if base is not None:
        try:
            with os.scandir(base) as entries:
                for e in entries:
                    if e.name.endswith(".json") and e.is_file():
                        st = e.stat()
                        out[e.name[: -len(".json")]] = [st.st_size, st.st_mtime_ns, st.st_ino]
        except FileNotFoundError:
            pass
        return out
    for pid in filecat.cataloged(storage):
        out[pid] = [storage.size(filecat.doc_name(pid)), 0, 0]
    return out


def _new_catalogs(
    storage: Storage,
    stamps: dict[str, list[int]],
    cached: dict[str, list[int]],
    problems: list[str],
) -> tuple[pa.Table | None, dict[str, list[int]]]:
    """The change rows of the catalogs the cache does not hold (as one table; None: none),
    and their stamps."""
    tables: list[pa.Table] = []
    done: dict[str, list[int]] = {}
    for pid in sorted(set(stamps) - set(cached)):
        try:
            doc = filecat.read_doc(storage, pid)
            if doc is None:
                continue
            name = filecat.data_name(doc.changes)
            rows = read_parquet(storage, name, _ROW_COLUMNS)
            if not rows.schema.equals(_CHANGE_SCHEMA):
                rows = rows.cast(_CHANGE_SCHEMA)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
            problems.append(f"{storage.local_path(name) or name}: {err}")
            continue
        except CombError as err:
            problems.append(err.message)
            continue
        tables.append(rows)
        done[pid] = stamps[pid]
    if not tables:
        return None, done
    rows = pa.concat_tables(tables)
    counts = [t.num_rows for t in tables]
    ids = pa.DictionaryArray.from_arrays(
        pa.array(np.repeat(np.arange(len(done), dtype=np.int32), counts)),
        pa.array(list(done), pa.string()),
    ).cast(pa.string())
    rows = rows.append_column("point_id", ids)
    rows = rows.filter(pc.not_equal(rows.column("change"), filecat.LOCATED))
    return rows.select(ROW_SCHEMA.names).cast(ROW_SCHEMA), done


def _new_points(storage: Storage, ids: set[str], live: set[str], problems: list[str]) -> pa.Table:
    got: dict[str, list[object]] = {n: [] for n in POINT_SCHEMA.names}
    for pid in sorted(ids):
        prefix = POINTS_PREFIX if pid in live else FORGOTTEN_PREFIX
        name = f"{prefix}/{pid}.json"
        try:
            where = storage.local_path(name) or name
            point = parse_point(storage.read(name), where, pid, storage.sealer)
        except CombError as err:
            problems.append(err.message)
            continue
        got["point_id"].append(pid)
        got["source"].append(point.source)
        got["time"].append(datetime.fromisoformat(point.time))
    return pa.table(got, schema=POINT_SCHEMA)


def _ipc(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def _save(path: str, cached: _Cached, storage: Storage) -> None:
    """Write the cache: a new file renamed over the old one (a reader sees either whole). A
    cache that cannot be written is no error: the next use reads the repository again."""
    header = json.dumps({"version": _VERSION, "catalogs": cached.catalogs}).encode()
    rows = _ipc(cached.rows)
    rest = b"".join([struct.pack("<QQ", len(header), len(rows)), header, rows, _ipc(cached.points)])
    body = _MAGIC + blake3.blake3(rest).digest() + rest
    tmp = f"{path}.{os.getpid()}-{secrets.token_hex(8)}.tmp"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(storage.sealer.seal_table(body, CACHE_KIND))
        os.replace(tmp, path)  # no fsync: a torn file fails its check and is rebuilt
    except OSError:
        pass
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _read(path: str, storage: Storage) -> _Cached | None:
    """The cache as saved, or None when there is none or it does not check (then rebuilt)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
        body = memoryview(storage.sealer.open_table(raw, CACHE_KIND, path))
    except (OSError, CorruptionError):
        return None
    n = len(_MAGIC) + 32
    rest = body[n:]
    if (
        bytes(body[: len(_MAGIC)]) != _MAGIC
        or blake3.blake3(rest).digest() != body[len(_MAGIC) : n]
    ):
        return None
    try:
        head_len, rows_len = struct.unpack_from("<QQ", rest)
        header = json.loads(bytes(rest[16 : 16 + head_len]))
        at = 16 + head_len
        rows = pa.ipc.open_stream(pa.py_buffer(rest[at : at + rows_len])).read_all()
        points = pa.ipc.open_stream(pa.py_buffer(rest[at + rows_len :])).read_all()
        if header.get("version") != _VERSION:
            return None
        if not rows.schema.equals(ROW_SCHEMA) or not points.schema.equals(POINT_SCHEMA):
            return None
        return _Cached(dict(header["catalogs"]), rows, points)
    except (ValueError, KeyError, TypeError, struct.error, pa.ArrowException):
        return None
