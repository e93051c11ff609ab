"""config.json and Repository.init/open: versions, features, chunk sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from combtest import TEST_PASSWORD

from catalog.errors import RepositoryError, UsageError
from catalog.repo import REPO_DIRS, Repository
from catalog.store.format import (
    CONFIG_NAME,
    DEFAULT_CHUNK_SIZE_BYTES,
    REPO_FORMAT_VERSION,
    RepoConfig,
    parse_config,
)


def test_config_round_trip() -> None:
    cfg = RepoConfig.new(8192)
    back = parse_config(cfg.to_json(), "cfg")
    assert back == cfg
    assert back.leaf_bytes == 8192 * back.leaf_chunks


@pytest.mark.parametrize("size", [0, 1000, 2048, 3 * 4096, 8 * 1024 * 1024])
def test_bad_chunk_sizes_are_refused(size: int) -> None:
    with pytest.raises(UsageError, match="power of two"):
        RepoConfig.new(size)


def _doc(**changes: object) -> bytes:
    doc = json.loads(RepoConfig.new().to_json())
    doc.update(changes)
    return json.dumps(doc).encode()


def test_unknown_version_is_refused_with_both_versions_named() -> None:
    with pytest.raises(RepositoryError) as err:
        parse_config(_doc(version=99), "/r/config.json")
    msg = str(err.value)
    assert "/r/config.json" in msg and "99" in msg and str(REPO_FORMAT_VERSION) in msg


@pytest.mark.parametrize(
    "raw",
    [b"{", b"[1, 2]", b"\xff\xfe", _doc(format="restic"), _doc(chunk_size="big")],
)
def test_garbage_configs_are_repository_errors(raw: bytes) -> None:
    with pytest.raises(RepositoryError, match="cfg"):
        parse_config(raw, "cfg")


def test_missing_field_is_a_repository_error() -> None:
    doc = json.loads(RepoConfig.new().to_json())
    del doc["chunk_size"]
    with pytest.raises(RepositoryError, match="chunk_size"):
        parse_config(json.dumps(doc).encode(), "cfg")


def test_unknown_incompat_feature_refused_compat_ignored() -> None:
    with pytest.raises(RepositoryError, match="encryption-v9"):
        parse_config(_doc(features={"incompat": ["encryption-v9"]}), "cfg")
    cfg = parse_config(_doc(features={"compat": ["shiny"]}), "cfg")
    assert cfg.features.compat == ("shiny",)


def test_init_creates_layout_and_open_reads_it(tmp_path: Path) -> None:
    repo = Repository.init(str(tmp_path / "r"), chunk_size=4096, password=TEST_PASSWORD)
    for d in REPO_DIRS:
        assert (tmp_path / "r" / d).is_dir()
    again = Repository.open(str(tmp_path / "r"), password=TEST_PASSWORD)
    assert again.config == repo.config
    assert again.config.chunk_size == 4096
    assert (
        Repository.init(str(tmp_path / "d"), password=TEST_PASSWORD).config.chunk_size
        == DEFAULT_CHUNK_SIZE_BYTES
    )


def test_init_refuses_existing_repository_and_non_empty_dirs(tmp_path: Path) -> None:
    Repository.init(str(tmp_path / "r"), password=TEST_PASSWORD)
    with pytest.raises(RepositoryError, match="already holds"):
        Repository.init(str(tmp_path / "r"), password=TEST_PASSWORD)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    with pytest.raises(RepositoryError, match="not an empty directory"):
        Repository.init(str(tmp_path / "busy"), password=TEST_PASSWORD)


def test_open_missing_and_foreign_directories(tmp_path: Path) -> None:
    with pytest.raises(RepositoryError, match="does not exist"):
        Repository.open(str(tmp_path / "nope"), password=TEST_PASSWORD)
    (tmp_path / "plain").mkdir()
    with pytest.raises(RepositoryError, match=f"no {CONFIG_NAME}"):
        Repository.open(str(tmp_path / "plain"), password=TEST_PASSWORD)


def test_open_refuses_future_version(tmp_path: Path) -> None:
    Repository.init(str(tmp_path / "r"), password=TEST_PASSWORD)
    cfg = tmp_path / "r" / CONFIG_NAME
    doc = json.loads(cfg.read_text())
    doc["version"] = 99
    cfg.write_text(json.dumps(doc))
    with pytest.raises(RepositoryError, match="unknown repository format version 99"):
        Repository.open(str(tmp_path / "r"), password=TEST_PASSWORD)


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("chunk_size", 3000, "chunk size"),
        ("chunk_size", 1 << 30, "chunk size"),
        ("leaf_chunks", 0, "leaf_chunks"),
        ("leaf_chunks", 40000, "leaf_chunks"),
        ("hash", "sha1", "hash"),
    ],
)
def test_config_values_are_validated(field: str, value: object, needle: str) -> None:
    with pytest.raises(RepositoryError, match=needle):
        parse_config(_doc(**{field: value}), "cfg")


def test_unknown_ro_compat_feature_opens_read_only(tmp_path: Path) -> None:
    Repository.init(str(tmp_path / "r"), encryption="none")
    cfg = tmp_path / "r" / CONFIG_NAME
    doc = json.loads(cfg.read_text())
    doc["features"] = {"ro_compat": ["future-index"]}
    cfg.write_text(json.dumps(doc))
    repo = Repository.open(str(tmp_path / "r"), password=TEST_PASSWORD)
    assert repo.config.read_only
    with pytest.raises(RepositoryError, match="future-index"):
        repo.require_writable()
