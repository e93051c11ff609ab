"""FORMAT.md's JSON document tables (config.json, point documents, lock files, overlay.json) and
time forms against the code."""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from pathlib import Path
from typing import Any

import pytest
from combtest import TEST_PASSWORD, api_backup
from spectables import (
    GOLDEN,
    golden_points,
    section,
    spec_example,
    spec_point_id,
    spec_table,
)

import drive.overlays.overlay as overlay
from catalog.errors import CorruptionError, RepositoryError
from catalog.repo import Repository
from catalog.store import condemned, crypto, locks, points
from catalog.store import format as fmt
from catalog.store.format import Features, RepoConfig, parse_config
from catalog.store.local import LocalStorage
from catalog.store.parity import ParityGeometry
from catalog.store.points import PointStats, RecoveryPoint

# ---------------------------------------------------------------------------------------------
# JSON documents


def _json_type(hint: Any) -> str:
    if hint is str:
        return "string"
    if hint is bool:
        return "boolean"
    if hint is int:
        return "integer"
    if hint is float:
        return "number"
    if dataclasses.is_dataclass(hint) or typing.get_origin(hint) is dict:
        return "object"
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple and args == (str, ...):
        return "array of strings"
    if origin is tuple and len(args) == 2 and args[1] is ... and typing.get_origin(args[0]) is dict:
        return "array of objects"
    if origin in (types.UnionType, typing.Union) and type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        return f"{_json_type(inner)} or null"
    raise AssertionError(f"no JSON type for {hint!r}")


def _fields_of(cls: type, nested: dict[str, type]) -> dict[str, str]:
    """{"field": json type, "nested.field": json type} of a dataclass document."""
    out = {}
    for name, hint in typing.get_type_hints(cls).items():
        out[name] = _json_type(hint)
        if name in nested:
            for sub, sub_hint in typing.get_type_hints(nested[name]).items():
                out[f"{name}.{sub}"] = _json_type(sub_hint)
    return out


def _keys_of(doc: dict[str, Any]) -> set[str]:
    out = set()
    for k, v in doc.items():
        out.add(k)
        if isinstance(v, dict):
            out |= {f"{k}.{sub}" for sub in v}
    return out


def test_config_fields_match_code() -> None:
    spec = {r["Field"]: r["JSON type"] for r in spec_table("config")}
    assert spec == _fields_of(RepoConfig, {"features": Features, "parity": ParityGeometry})


def test_config_json_has_the_spec_fields() -> None:
    spec = {r["Field"] for r in spec_table("config")}
    new = json.loads(RepoConfig.new().to_json())
    # only in encrypted repositories' configs, and in those with Object Lock
    optional = {"encryption", "object_lock"}
    assert _keys_of(new) == spec - optional
    sealed = _keys_of(json.loads(RepoConfig.new(encrypted=True).to_json()))
    assert {k for k in sealed if not k.startswith("encryption.")} == spec - {"object_lock"}
    locked = dataclasses.replace(RepoConfig.new(), object_lock={"days": 7, "mode": "GOVERNANCE"})
    assert parse_config(locked.to_json(), "config.json") == locked
    # golden-v1 predates parity (FORMAT.md 4: a missing parity field reads as null)
    golden = _keys_of(json.loads((GOLDEN / fmt.CONFIG_NAME).read_bytes()))
    assert golden == {k for k in spec - optional if k.split(".")[0] != "parity"}
    assert new["chunk_size"] == fmt.DEFAULT_CHUNK_SIZE_BYTES
    assert new["leaf_chunks"] == fmt.DEFAULT_LEAF_CHUNKS
    assert new["features"] == {"compat": [], "ro_compat": ["parity"], "incompat": []}
    assert new["parity"] == {"data_shards": 16, "parity_shards": 2, "shard_bytes": 262144}
    off = json.loads(RepoConfig.new(parity=None).to_json())
    assert off["parity"] is None and off["features"]["ro_compat"] == []


def _config(**changes: Any) -> bytes:
    doc = json.loads(RepoConfig.new().to_json())
    doc.update(changes)
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    "changes",
    [
        {"chunk_size": fmt.MIN_CHUNK_SIZE_BYTES},
        {"chunk_size": fmt.MAX_CHUNK_SIZE_BYTES},
        {"leaf_chunks": 1},
        {"leaf_chunks": fmt.MAX_LEAF_CHUNKS},
        {"features": {"compat": ["later-hint"], "ro_compat": [], "incompat": []}},
        {"added_by_a_later_comb": True},
    ],
)
def test_config_values_the_spec_allows_are_opened(changes: dict[str, Any]) -> None:
    config = parse_config(_config(**changes), "config.json")
    assert not config.read_only


@pytest.mark.parametrize(
    "changes",
    [
        {"chunk_size": fmt.MIN_CHUNK_SIZE_BYTES // 2},
        {"chunk_size": fmt.MAX_CHUNK_SIZE_BYTES * 2},
        {"chunk_size": 3 * 16384},
        {"leaf_chunks": 0},
        {"leaf_chunks": fmt.MAX_LEAF_CHUNKS + 1},
        {"hash": "sha256"},
        {"version": fmt.REPO_FORMAT_VERSION + 1},
        {"features": {"compat": [], "ro_compat": [], "incompat": ["later-must-know"]}},
    ],
)
def test_config_values_the_spec_forbids_are_refused(changes: dict[str, Any]) -> None:
    with pytest.raises(RepositoryError):
        parse_config(_config(**changes), "config.json")


def test_unknown_ro_compat_feature_opens_read_only() -> None:
    feats = {"compat": [], "ro_compat": ["later-writers-must-know"], "incompat": []}
    assert parse_config(_config(features=feats), "config.json").read_only


def test_point_fields_match_code() -> None:
    """The table lists the document's fields: every field of RecoveryPoint but the id, which is
    not in the document but names its file."""
    spec = {r["Field"]: r["JSON type"] for r in spec_table("point")}
    code = _fields_of(RecoveryPoint, {"stats": PointStats})
    assert code.pop("id") == "string"
    assert spec == code


# Fields added after golden-v1 was written (comb 0.2: change tables, section 8.5).
# (comb 0.3: vSphere sources, section 8.6).
# (comb 0.4: block lists, section 7.1).
# (comb 0.5: tags and description, section 9; written only when given; then copy_of, and
# read_on: the Ray nodes that read the source).
_AFTER_GOLDEN_V1 = {
    "changes",
    "stats.bytes_changed",
    "stats.bytes_data",
    "vsphere",
    "blocks",
    "tags",
    "description",
    "copy_of",
    "read_on",
}


def test_point_documents_have_the_spec_fields() -> None:
    spec = {r["Field"] for r in spec_table("point")}
    for path in golden_points():
        assert _keys_of(json.loads(path.read_bytes())) == spec - _AFTER_GOLDEN_V1, path.name
    assert _keys_of(json.loads(_made_point().to_json())) == spec


def _made_point() -> RecoveryPoint:
    return RecoveryPoint(
        source="disk é ☃",
        source_path="/dev/disk",
        time="2026-01-02T03:04:05.000006+00:00",
        size=12345,
        chunk_size=65536,
        leaf_chunks=16,
        root="ab" * 32,
        leaves=None,
        parent=None,
        index_segment=None,
        engine="local",
        mode="full",
        tags=("nightly", "é"),
        description="a point ☃",
        copy_of="0123456789abcdef",
        read_on=({"node_id": "ab" * 28, "address": "10.0.0.1"},),
        stats=PointStats(seconds=1e-05),
    )


def test_point_id_rule(tmp_path: Path) -> None:
    for path in golden_points():
        assert spec_point_id(path.read_bytes()) == path.stem
    storage = LocalStorage(str(tmp_path))
    made = points.commit_point(storage, _made_point())
    raw = storage.read(points.point_name(made.id))
    assert spec_point_id(raw) == made.id
    # What writers write (section 9); the id is not a field of the document.
    body = json.loads(raw)
    assert "id" not in body
    assert raw == (json.dumps(body, indent=2, sort_keys=True) + "\n").encode()


def test_point_readers_follow_the_spec() -> None:
    """Section 9: the hash is over the bytes as stored, whatever their layout; unknown fields
    are ignored; a name that does not match the bytes is damage."""
    raw = golden_points()[0].read_bytes()
    doc = json.loads(raw)
    expected = points.parse_point(raw, "golden", spec_point_id(raw))
    doc["added_by_a_later_comb"] = {"x": 1}
    doc["stats"]["later_stat"] = 2
    for other in (
        json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode(),
        json.dumps(dict(reversed(doc.items())), indent=4).encode(),
    ):
        got = points.parse_point(other, "reformatted", spec_point_id(other))
        assert dataclasses.replace(got, id=expected.id) == expected
        with pytest.raises(CorruptionError, match="does not match"):
            points.parse_point(other, "misnamed", expected.id)
    del doc["change_id"]
    for k in list(doc["stats"]):
        del doc["stats"][k]
    minimal = json.dumps(doc).encode()
    got = points.parse_point(minimal, "minimal", spec_point_id(minimal))
    assert got.change_id is None and got.stats == PointStats()
    for required in ("format", "version", "stats", "root", "size", "mode"):
        broken = {k: v for k, v in doc.items() if k != required}
        raw_broken = json.dumps(broken).encode()
        with pytest.raises(CorruptionError):
            points.parse_point(raw_broken, "broken", spec_point_id(raw_broken))


def test_point_example_is_what_the_writer_writes() -> None:
    """Section 9's example is a current document byte for byte: every field of the table, the
    writer's formatting, and named by its id."""
    raw = spec_example("point").encode()
    point_id = spec_point_id(raw)
    assert f"`{point_id}`" in section("9")
    got = points.parse_point(raw, "example", point_id)
    assert got.to_json() == raw  # what RecoveryPoint writes for these values, byte for byte
    fields = {k for k in _keys_of(json.loads(raw)) if not k.startswith("blocks.")}
    assert fields == {r["Field"] for r in spec_table("point")}


def test_golden_point_example_is_a_golden_document() -> None:
    """Section 18's example is a golden-v1 point document byte for byte."""
    raw = spec_example("golden-point").encode()
    point_id = spec_point_id(raw)
    assert f"`points/{point_id}.json`" in section("18")
    assert (GOLDEN / points.POINTS_PREFIX / f"{point_id}.json").read_bytes() == raw


# ---------------------------------------------------------------------------------------------
# Times (section 2)


def _form_regex(form: str) -> re.Pattern[str]:
    """``YYYY-MM-DDThh:mm:ss.ffffff+00:00``: the letters Y M D h m s f are digits."""
    return re.compile("".join(r"\d" if c in "YMDhmsf" else re.escape(c) for c in form))


def _times_written(tmp_path: Path) -> dict[str, list[str]]:
    """Each row of the times table: values the code writes there."""
    repo_dir = tmp_path / "repo"
    repo = Repository.init(str(repo_dir), encryption="none")
    image = tmp_path / "disk.img"
    image.write_bytes(b"x" * 70000)
    point = api_backup(repo_dir, image, name="disk")
    key = json.loads(crypto.make_key_file(repo.config.id, bytes(64), "pw"))
    with locks.locked(repo.storage, "verify") as lock:
        lock_doc = json.loads(repo.storage.read(lock.info.name))
    overlay.create(repo, "ov", point)
    overlay_doc = json.loads((repo_dir / "overlays" / "ov" / "overlay.json").read_bytes())
    return {
        "config.json `created`": [repo.config.created],
        "key file `created`": [key["created"]],
        "point `time`": [
            point.time,
            *(p.time for p in Repository.open(str(repo_dir), password=TEST_PASSWORD).points()),
        ],
        "lock `started`, `heartbeat`": [lock_doc["started"], lock_doc["heartbeat"]],
        "overlay.json `created`": [overlay_doc["created"]],
    }


def test_time_forms(tmp_path: Path) -> None:
    rows = spec_table("times")
    written = _times_written(tmp_path)
    assert [r["Field"] for r in rows] == list(written)
    for row in rows:
        rx = _form_regex(row["Form"])
        assert rx.fullmatch(row["Example"]), row["Field"]
        for value in written[row["Field"]]:
            assert rx.fullmatch(value), f"{row['Field']}: the code wrote {value!r}"
    # The golden documents and the example of section 9 have the form too.
    point_form = _form_regex(next(r["Form"] for r in rows if r["Field"] == "point `time`"))
    for raw in [p.read_bytes() for p in golden_points()] + [spec_example("point").encode()]:
        assert point_form.fullmatch(json.loads(raw)["time"])


# ---------------------------------------------------------------------------------------------
# Lock files (section 13) and overlay.json (section 19.2)


def test_lock_fields_match_code(tmp_path: Path) -> None:
    rows = spec_table("lock")
    spec = {r["Field"]: r["JSON type"] for r in rows}
    # ``age`` is not in the file: the storage's clock tells it (read_locks).
    assert spec == {k: v for k, v in _fields_of(locks.LockInfo, {}).items() if k != "age"}
    repo = Repository.init(str(tmp_path / "repo"), encryption="none")
    with locks.locked(repo.storage, "backup", command="backup /dev/x") as lock:
        raw = repo.storage.read(lock.info.name)
        assert locks.read_locks(repo.storage) == [lock.info]
    # One line, the fields in the table's order, no final newline; named by its id.
    assert b"\n" not in raw
    doc = json.loads(raw)
    assert list(doc) == [r["Field"] for r in rows]
    assert lock.info.name == f"{locks.LOCKS_PREFIX}/{doc['id']}.json"
    assert re.fullmatch(r"[0-9a-f]{16}", doc["id"])


def test_condemnation_record_fields_match_code(tmp_path: Path) -> None:
    repo = Repository.init(str(tmp_path / "repo"), encryption="none")
    pack = "ab" * 32
    when = condemned.write(repo.storage, "0123456789abcdef", [pack], ["roots/x.parquet"])
    name = condemned.record_name("0123456789abcdef")
    assert name == "gc/0123456789abcdef.json" and when == repo.storage.mtime(name)
    doc = json.loads(repo.storage.read(name))
    json_types = {str: "string", int: "integer", list: "array of strings"}
    assert {r["Field"]: r["JSON type"] for r in spec_table("condemned")} == {
        k: json_types[type(v)] for k, v in doc.items()
    }
    assert doc["format"] == "comb-condemned" and doc["version"] == 1
    assert doc["packs"] == [pack] and doc["files"] == ["roots/x.parquet"]
    assert condemned.condemned_packs(repo.storage) == {pack}


def test_overlay_fields_match_code(tmp_path: Path) -> None:
    repo = Repository.init(str(tmp_path / "repo"), encryption="none")
    point = dataclasses.replace(_made_point(), id="0123456789abcdef")
    overlay.create(repo, "ov", point)
    raw = (tmp_path / "repo" / "overlays" / "ov" / "overlay.json").read_bytes()
    doc = json.loads(raw)
    json_types = {str: "string", int: "integer"}
    assert {r["Field"]: r["JSON type"] for r in spec_table("overlay")} == {
        k: json_types[type(v)] for k, v in doc.items()
    }
    assert raw == (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()
    assert doc["format"] == "comb-overlay" and doc["version"] == 1
    assert re.fullmatch(r"[0-9a-f]{32}", doc["id"]) and doc["base"] == point.id
