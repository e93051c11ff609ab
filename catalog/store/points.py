"""Recovery-point documents: the one atomic commit of a backup, and how points are found.

A point becomes visible when ``points/<id>.json`` is renamed into place, after every file it
references (packs, index segment, leaves, root) is durable. The id is the first 16 hex digits of
the BLAKE3 of the document's exact bytes, so a document is named by its content like every other
repository file (the id is not inside the document). Readers ignore fields they do not know, so
later versions can add fields without breaking older readers.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import blake3

from catalog.errors import CorruptionError, PointNotFound
from catalog.store.sealing import PLAIN, Sealer
from catalog.store.storage import Storage

POINTS_PREFIX = "points"
FORGOTTEN_PREFIX = "forgotten"  # documents of forgotten points, kept for analytics (FORMAT 9.1)
POINT_FORMAT_NAME = "comb-point"
POINT_FORMAT_VERSION = 1
POINT_ID_HEX = 16
POINT_DOC_KIND = "point"  # associated data of a sealed point document


@dataclass(frozen=True)
class PointStats:
    bytes_read: int = 0
    bytes_new: int = 0
    bytes_stored: int = 0
    bytes_zero: int = 0
    bytes_changed: int = 0
    bytes_data: int = 0
    chunks: int = 0
    chunks_new: int = 0
    leaves_new: int = 0
    leaves_shared: int = 0
    metadata_bytes: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class RecoveryPoint:
    source: str
    source_path: str
    time: str
    size: int
    chunk_size: int
    leaf_chunks: int
    root: str
    leaves: str | None
    parent: str | None
    index_segment: str | None
    engine: str
    mode: str  # "full", "changed-extents" or "full-reread"
    change_id: str | None = None
    changes: str | None = None
    # Where the point came from when the source is a VMware vSphere VM disk (FORMAT.md 8.6):
    # the VM's configuration, the disk, the snapshot and what Changed Block Tracking answered.
    vsphere: dict[str, Any] | None = None
    # Block lists (catalog.store.blocks, FORMAT.md 7.1) of the leaves file and index segment this
    # backup wrote: {"leaves": BLAKE3 hex or null, "index_segment": BLAKE3 hex or null}.
    blocks: dict[str, Any] | None = None
    # Labels given to the backup (``--tag``, ``--description``); written only when given, so a
    # document without them is byte for byte what comb wrote before them.
    tags: tuple[str, ...] = ()
    description: str | None = None
    # For a point ``comb copy`` wrote: the id of the point it copies (in the repository it came
    # from). Written only for copies.
    copy_of: str | None = None
    # The Ray nodes whose workers read the source (``[{"node_id", "address"}]``, by node id).
    # Written only by the Ray engine.
    read_on: tuple[dict[str, str], ...] = ()
    stats: PointStats = field(default_factory=PointStats)
    id: str = ""
    format: str = POINT_FORMAT_NAME
    version: int = POINT_FORMAT_VERSION

    def body(self) -> dict[str, Any]:
        """The document's fields (everything but the id, which names the file)."""
        doc = asdict(self)
        doc.pop("id")
        unset_fields = (("tags", ()), ("description", None), ("copy_of", None), ("read_on", ()))
        for name, unset in unset_fields:
            if doc[name] == unset:
                del doc[name]
        return doc

    def to_json(self) -> bytes:
        return (json.dumps(self.body(), indent=2, sort_keys=True) + "\n").encode()

    def with_id(self) -> RecoveryPoint:
        return replace(self, id=point_id_of(self.to_json()))


def point_id_of(raw: bytes) -> str:
    return blake3.blake3(raw).hexdigest()[:POINT_ID_HEX]


def point_name(point_id: str) -> str:
    return f"{POINTS_PREFIX}/{point_id}.json"


def forgotten_name(point_id: str) -> str:
    return f"{FORGOTTEN_PREFIX}/{point_id}.json"


def commit_point(storage: Storage, point: RecoveryPoint) -> RecoveryPoint:
    """The commit: write the document atomically (tmp + fsync + rename + fsync(dir)). In an
    encrypted repository the document is sealed, and the id hashes the sealed bytes."""
    raw = point.to_json()
    raw = storage.sealer.seal_doc(raw, POINT_DOC_KIND)
    point = replace(point, id=point_id_of(raw))
    storage.write_atomic(point_name(point.id), raw)
    return point


def retire_point(storage: Storage, point_id: str) -> None:
    """Forget a point: its document's exact bytes go to ``forgotten/`` (committed first, so a
    crash in between leaves the point live), then ``points/<id>.json`` is removed. What the
    point referenced is left to prune, which keeps the change table for analytics."""
    raw = storage.read(point_name(point_id))
    if point_id_of(raw) != point_id:
        raise CorruptionError(f"{point_name(point_id)} does not match its id (modified or damaged)")
    storage.write_atomic(forgotten_name(point_id), raw)
    storage.remove(point_name(point_id))


_FIELDS = {f.name for f in fields(RecoveryPoint)} - {"id"}
_STAT_FIELDS = {f.name for f in fields(PointStats)}


def parse_point(
    raw: bytes, where: str, point_id: str | None = None, sealer: Sealer = PLAIN
) -> RecoveryPoint:
    """Parse a point document; ``point_id`` (from its file name) must match its stored bytes,
    which ``sealer`` opens (an encrypted repository's are sealed)."""
    if point_id is not None and point_id_of(raw) != point_id:
        raise CorruptionError(f"{where} does not match its id (modified or damaged)")
    stored = raw
    raw = sealer.open_doc(raw, POINT_DOC_KIND, where)
    try:
        doc = json.loads(raw)
        if not isinstance(doc, dict) or doc.get("format") != POINT_FORMAT_NAME:
            raise ValueError("not a recovery point document")
        if doc.get("version") != POINT_FORMAT_VERSION:
            raise ValueError(f"unknown version {doc.get('version')!r}")
        stats = doc["stats"]
        if not isinstance(stats, dict):
            raise ValueError("stats is not an object")
        known = {k: v for k, v in doc.items() if k in _FIELDS and k != "stats"}
        for name in ("tags", "read_on"):
            if isinstance(known.get(name), list):
                known[name] = tuple(known[name])
        point = RecoveryPoint(
            **known,
            stats=PointStats(**{k: v for k, v in stats.items() if k in _STAT_FIELDS}),
            id=point_id or point_id_of(stored),
        )
    except KeyError as err:
        raise CorruptionError(
            f"{where} is not a valid recovery point document (no {err})"
        ) from None
    except (ValueError, TypeError, AttributeError) as err:
        raise CorruptionError(f"{where} is not a valid recovery point document ({err})") from None
    for f in fields(RecoveryPoint):
        if f.name in ("stats", "id"):
            continue
        if not _type_ok(getattr(point, f.name), str(f.type)):
            raise CorruptionError(f"{where}: field {f.name} has the wrong type")
    for f in fields(PointStats):
        if not _type_ok(getattr(point.stats, f.name), str(f.type)):
            raise CorruptionError(f"{where}: field stats.{f.name} has the wrong type")
    return point


def _type_ok(value: object, annotation: str) -> bool:
    """Check a JSON value against a dataclass field's annotation (str, int, float, optional)."""
    if value is None:
        return "None" in annotation
    if isinstance(value, bool):
        return False
    if annotation.startswith("str"):
        return isinstance(value, str)
    if annotation.startswith("int"):
        return isinstance(value, int)
    if annotation.startswith("float"):
        return isinstance(value, int | float)
    if annotation.startswith("dict"):
        return isinstance(value, dict)
    if annotation.startswith("tuple[str"):
        return isinstance(value, tuple) and all(isinstance(v, str) for v in value)
    if annotation.startswith("tuple[dict[str, str]"):  # (read_on: objects of strings)
        return isinstance(value, tuple) and all(
            isinstance(v, dict) and all(isinstance(x, str) for x in v.values()) for v in value
        )
    return True


def load_points(storage: Storage) -> list[RecoveryPoint]:
    """Every committed point, oldest first."""
    points, _bad = load_points_tolerant(storage)
    return points


def load_points_tolerant(
    storage: Storage, prefix: str = POINTS_PREFIX
) -> tuple[list[RecoveryPoint], list[str]]:
    """Every readable committed point (oldest first), and one message per damaged document.
    With ``FORGOTTEN_PREFIX``: the documents of forgotten points instead.

    One damaged document must not make every other recovery point unreachable."""
    points = []
    bad = []
    for name in storage.list(prefix):
        if not name.endswith(".json"):
            continue
        pid = name.rsplit("/", 1)[-1][: -len(".json")]
        try:
            where = storage.local_path(name) or name
            points.append(parse_point(_document(storage, name, pid), where, pid, storage.sealer))
        except CorruptionError as err:
            bad.append(err.message)
    return sorted(points, key=lambda p: (p.time, p.id)), bad


def _document(storage: Storage, name: str, point_id: str) -> bytes:
    """A point document's bytes; on object storage from its local copy (fetched once per
    machine, not at every backup: a document never changes, its name is its hash), which must
    match its name, or else the object itself."""
    if storage.local_path(name) is not None:
        return storage.read(name)
    try:
        with open(storage.local_copy(name), "rb") as fh:
            raw = fh.read()
        if point_id_of(raw) == point_id:
            return raw
    except OSError:
        pass  # trimmed meanwhile
    return storage.read(name)


def load_forgotten(
    storage: Storage, live: list[RecoveryPoint]
) -> tuple[list[RecoveryPoint], list[str]]:
    """The forgotten points' documents (oldest first) that are not live points too (a forget
    that crashed between its two steps leaves both; the point is then still live), and one
    message per damaged document."""
    ids = {p.id for p in live}
    gone, bad = load_points_tolerant(storage, FORGOTTEN_PREFIX)
    return [p for p in gone if p.id not in ids], bad


def latest_for(points: list[RecoveryPoint], source: str) -> RecoveryPoint | None:
    """The latest point of source name ``source``, whatever it was read from (``NAME@latest``).
    Not the point a device's change list is relative to: see ``last_read``."""
    mine = [p for p in points if p.source == source]
    return mine[-1] if mine else None


def last_read(points: list[RecoveryPoint], source: str, source_path: str) -> RecoveryPoint | None:
    """The latest point of source name ``source`` whose ``source_path`` is ``source_path``: the
    last time this device (an image's or block device's absolute path) was read under that
    name. A change list of the device is valid against this point only; the source's latest
    point may have been read from elsewhere (``overlay:NAME``, another path under the same
    ``--source-name``) and hold other data."""
    mine = [p for p in points if p.source == source and p.source_path == source_path]
    return mine[-1] if mine else None


def backup_parent(
    points: list[RecoveryPoint], source: str, source_path: str
) -> tuple[RecoveryPoint | None, bool]:
    """The parent of a backup of the image or device ``source_path`` under ``source`` (FORMAT.md
    8.4): its ``last_read``, else the source's latest point (or None); and whether the parent
    was read from ``source_path``, i.e. whether a change list of the device applies to it."""
    own = last_read(points, source, source_path)
    if own is not None:
        return own, True
    return latest_for(points, source), False


def last_vsphere_read(points: list[RecoveryPoint], source: str) -> RecoveryPoint | None:
    """The latest point of ``source`` read from vSphere (it has a ``vsphere`` document): the
    parent of a vSphere disk's backup, whose ``change_id`` CBT is asked about (FORMAT.md 8.6).
    A backup of an overlay of such a point has neither document nor change id: skipped."""
    mine = [p for p in points if p.source == source and p.vsphere is not None]
    return mine[-1] if mine else None


# Ids an ambiguous prefix's error lists.
_AMBIGUOUS_SHOWN = 4


def resolve(points: list[RecoveryPoint], spec: str) -> RecoveryPoint:
    """The point ``spec`` names, in the one grammar every command takes:

    - ``ID``, or a unique prefix of one (hex digits, either case);
    - ``SOURCE@latest``: the latest point of source ``SOURCE``;
    - ``SOURCE@ID`` or ``SOURCE@PREFIX``: that point, which must be one of ``SOURCE``'s.

    ``SOURCE`` ends at the last ``@`` (a source name may contain one). A relative path names
    the source of its absolute path when no source has the name as given. An ambiguous prefix
    is an error that lists the first few of the points it matches."""
    source, at, wanted = spec.rpartition("@")
    if at and wanted == "latest":
        return _of_source(points, source)[-1]
    prefix = wanted if at else spec
    if not prefix or any(c not in "0123456789abcdef" for c in prefix.lower()):
        raise PointNotFound(
            f"{spec!r} is not a recovery point id, prefix, SOURCE@latest or SOURCE@ID"
        )
    pool, of = (_of_source(points, source), f" of source {source!r}") if at else (points, "")
    matches = [p for p in pool if p.id.startswith(prefix.lower())]
    if not matches:
        raise PointNotFound(f"no recovery point {prefix!r}{of}")
    if len(matches) > 1:
        shown = ", ".join(p.id for p in matches[:_AMBIGUOUS_SHOWN])
        more = ", ..." if len(matches) > _AMBIGUOUS_SHOWN else ""
        raise PointNotFound(
            f"recovery point prefix {prefix!r}{of} is ambiguous "
            f"({len(matches)} match: {shown}{more})"
        )
    return matches[0]


def _of_source(points: list[RecoveryPoint], source: str) -> list[RecoveryPoint]:
    """The points of ``source`` (oldest first), or of its absolute path when it has none."""
    mine = [p for p in points if p.source == source]
    if not mine and source:
        absolute = os.path.abspath(source)
        mine = [p for p in points if p.source == absolute]
    if not mine:
        raise PointNotFound(f"no recovery point for source {source!r}")
    return mine
