"""FORMAT.md's JSON document tables (config.json, point documents) against the code."""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from pathlib import Path
from typing import Any

import pytest
from spectables import (
    GOLDEN,
    SPEC,
    golden_points,
    spec_point_id,
    spec_table,
)

from catalog.errors import CorruptionError, RepositoryError
from catalog.store import format as fmt
from catalog.store import points
from catalog.store.format import Features, RepoConfig, parse_config
from catalog.store.parity import ParityGeometry
from catalog.store.points import PointStats, RecoveryPoint
from catalog.store.storage import LocalStorage

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
    optional = {"encryption"}  # only in encrypted repositories' configs
    assert _keys_of(new) == spec - optional
    sealed = _keys_of(json.loads(RepoConfig.new(encrypted=True).to_json()))
    assert {k for k in sealed if not k.startswith("encryption.")} == spec
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
_AFTER_GOLDEN_V1 = {"changes", "stats.bytes_changed", "stats.bytes_data", "vsphere", "blocks"}


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


def test_point_example_is_a_golden_document() -> None:
    """The example of section 9 is a golden point document byte for byte."""
    text = SPEC.read_text(encoding="utf-8")
    section = text[text.index("## 9. Recovery point documents") : text.index("## 10. Constants")]
    m = re.search(
        r"`points/([0-9a-f]{16})\.json`, byte for byte.*?```json\n(.*?)```", section, re.S
    )
    assert m, "section 9 must show a golden point document in a json code block"
    example = m.group(2).encode()
    assert spec_point_id(example) == m.group(1)
    assert (GOLDEN / points.POINTS_PREFIX / f"{m.group(1)}.json").read_bytes() == example
