"""Recovery-point documents: content-named commit, tamper detection, resolving ids."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import blake3
import pytest

from catalog.errors import CorruptionError, PointNotFound
from catalog.store.local import LocalStorage
from catalog.store.points import (
    POINT_ID_HEX,
    PointStats,
    RecoveryPoint,
    backup_parent,
    commit_point,
    last_read,
    last_vsphere_read,
    latest_for,
    load_points,
    load_points_tolerant,
    parse_point,
    point_name,
    resolve,
)
from catalog.store.storage import TMP_DIR


@pytest.fixture
def storage(tmp_path: Path) -> LocalStorage:
    (tmp_path / TMP_DIR).mkdir()
    return LocalStorage(str(tmp_path))


def _point(
    source: str = "disk", time: str = "2025-01-01T00:00:00+00:00", **kw: object
) -> RecoveryPoint:
    base = RecoveryPoint(
        source=source,
        source_path=f"/dev/{source}",
        time=time,
        size=1 << 20,
        chunk_size=65536,
        leaf_chunks=16,
        root="r" * 64,
        leaves="l" * 64,
        parent=None,
        index_segment=None,
        engine="local",
        mode="full",
        stats=PointStats(bytes_read=10, bytes_new=5, seconds=0.5),
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def test_commit_names_the_document_by_its_content(storage: LocalStorage) -> None:
    p = commit_point(storage, _point())
    assert len(p.id) == POINT_ID_HEX
    raw = storage.read(point_name(p.id))
    assert p.id == blake3.blake3(raw).hexdigest()[:POINT_ID_HEX]
    assert storage.list("points") == [point_name(p.id)]
    assert parse_point(raw, "w", p.id) == p
    assert parse_point(raw, "w") == p  # without a name, the id comes from the bytes
    assert storage.tmp_files() == []


def test_load_points_oldest_first(storage: LocalStorage) -> None:
    late = commit_point(storage, _point(time="2025-03-01T00:00:00+00:00"))
    early = commit_point(storage, _point(time="2025-01-01T00:00:00+00:00"))
    other = commit_point(storage, _point("other", time="2025-02-01T00:00:00+00:00"))
    assert [p.id for p in load_points(storage)] == [early.id, other.id, late.id]
    assert latest_for(load_points(storage), "disk") == late
    assert latest_for(load_points(storage), "nope") is None


def test_parent_is_the_last_read_of_the_same_device() -> None:
    """A change list is only valid against the last point read from the same device: an
    overlay's backup (or a backup of another path under the same name) is the source's latest
    point, but not the parent of the device's next backup."""
    t = "2025-01-0{}T00:00:00+00:00"
    dev = _point("v", t.format(1), source_path="/x/s.img", id="a1")
    vs = _point("v", t.format(2), source_path="vsphere://h/p [d]", vsphere={"cbt": {}}, id="b2")
    ov = _point("v", t.format(3), source_path="overlay:o1", parent="a1", id="c3")
    points = [dev, vs, ov]
    assert latest_for(points, "v") == ov
    assert last_read(points, "v", "/x/s.img") == dev
    assert last_read(points, "v", "/y.img") is None and last_read(points, "w", "/x/s.img") is None
    assert backup_parent(points, "v", "/x/s.img") == (dev, True)
    assert backup_parent(points, "v", "/y.img") == (ov, False)  # read whole, a note says why
    assert backup_parent(points, "w", "/y.img") == (None, False)
    assert last_vsphere_read(points, "v") == vs and last_vsphere_read([dev, ov], "v") is None


def _edited(storage: LocalStorage, edit: Callable[[dict[str, Any]], object]) -> tuple[str, bytes]:
    """A committed point's id, and its document changed by ``edit`` (same layout)."""
    p = commit_point(storage, _point())
    doc = json.loads(storage.read(point_name(p.id)))
    edit(doc)
    return p.id, (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()


def test_changed_statistics_are_detected(storage: LocalStorage) -> None:
    pid, raw = _edited(storage, lambda d: d["stats"].update(bytes_read=11))
    with pytest.raises(CorruptionError, match="W does not match its id"):
        parse_point(raw, "W", pid)


def test_changed_root_is_detected(storage: LocalStorage) -> None:
    pid, raw = _edited(storage, lambda d: d.update(root="e" * 64))
    with pytest.raises(CorruptionError, match="does not match its id"):
        parse_point(raw, "W", pid)


def test_damaged_documents_are_skipped_and_reported(storage: LocalStorage) -> None:
    good = commit_point(storage, _point(time="2025-01-01T00:00:00+00:00"))
    bad = commit_point(storage, _point(time="2025-01-02T00:00:00+00:00"))
    path = storage.path(point_name(bad.id))
    with open(path, "r+b") as fh:
        fh.seek(30)
        b = fh.read(1)
        fh.seek(30)
        fh.write(bytes([b[0] ^ 1]))
    points, damaged = load_points_tolerant(storage)
    assert [p.id for p in points] == [good.id]
    assert len(damaged) == 1 and path in damaged[0]
    assert [p.id for p in load_points(storage)] == [good.id]


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"{not json",
        b"[]",
        b'{"format": "comb-point", "version": 2}',
        b'{"format": "something"}',
        b"\xff\xfe\x00",
    ],
)
def test_garbage_documents_are_corruption_errors(raw: bytes) -> None:
    with pytest.raises(CorruptionError, match="W is not a valid recovery point document"):
        parse_point(raw, "W")


@pytest.mark.parametrize("key", ["stats", "root", "source"])
def test_a_missing_field_is_a_corruption_error(storage: LocalStorage, key: str) -> None:
    """One damaged key name (a flipped byte) must not escape as a KeyError/TypeError."""
    _, raw = _edited(storage, lambda d: d.pop(key))
    with pytest.raises(CorruptionError, match="W"):
        parse_point(raw, "W")


@pytest.mark.parametrize(
    ("key", "value"),
    [("root", 5), ("size", "big"), ("stats", [1]), ("read_on", "x"), ("read_on", 5),
     ("read_on", [5]), ("read_on", [{"node_id": 5}])],
)  # fmt: skip
def test_a_field_of_the_wrong_type_is_a_corruption_error(
    storage: LocalStorage, key: str, value: object
) -> None:
    _, raw = _edited(storage, lambda d: d.update({key: value}))
    with pytest.raises(CorruptionError, match="W"):
        parse_point(raw, "W")


def test_unknown_fields_are_ignored(storage: LocalStorage) -> None:
    """Later versions may add fields: older readers ignore them."""
    _, raw = _edited(storage, lambda d: (d.update(extra=1), d["stats"].update(more=2)))
    p = parse_point(raw, "W")
    assert p.root == "r" * 64 and p.stats.bytes_read == 10


def _with_id(
    pid: str, source: str = "disk", time: str = "2025-01-01T00:00:00+00:00"
) -> RecoveryPoint:
    return replace(_point(source, time), id=pid)


POINTS = [
    _with_id("ab12000000000000", time="2025-01-01T00:00:00+00:00"),
    _with_id("ab34000000000000", time="2025-01-02T00:00:00+00:00"),
    _with_id("cd00000000000000", "vm1", time="2025-01-03T00:00:00+00:00"),
    _with_id("ef00000000000000", "vm1", time="2025-01-04T00:00:00+00:00"),
]


def test_resolve_by_id_prefix_and_latest() -> None:
    assert resolve(POINTS, "ab12000000000000").id == "ab12000000000000"
    assert resolve(POINTS, "ab3").id == "ab34000000000000"
    assert resolve(POINTS, "CD").id == "cd00000000000000"
    assert resolve(POINTS, "vm1@latest").id == "ef00000000000000"
    assert resolve(POINTS, "disk@latest").id == "ab34000000000000"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("ab", "ambiguous"),
        ("99", "no recovery point '99'"),
        ("nope@latest", "no recovery point for source 'nope'"),
        ("", "is not a recovery point id"),
        ("xyz", "is not a recovery point id"),
        ("../etc", "is not a recovery point id"),
    ],
)
def test_resolve_failures(spec: str, message: str) -> None:
    with pytest.raises(PointNotFound, match=message):
        resolve(POINTS, spec)
