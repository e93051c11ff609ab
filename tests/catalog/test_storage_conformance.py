"""One conformance suite for the storage interface (``catalog.store.storage.Storage``), run on
a local directory and on a real S3 server (moto, its own process): what every call promises,
whichever storage a repository is on."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from email.utils import formatdate
from pathlib import Path
from typing import Any

import pytest
from s3server import S3Server

from catalog.errors import RepositoryError
from catalog.store import locks, s3
from catalog.store.local import LocalStorage
from catalog.store.s3 import S3Storage
from catalog.store.storage import TMP_DIR, Storage


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Storage]:
    if request.param == "local":
        (tmp_path / TMP_DIR).mkdir()
        yield LocalStorage(str(tmp_path))
        return
    server: S3Server = request.getfixturevalue("s3_env")
    yield S3Storage.existing(f"s3://{server.bucket()}/some/prefix")


def test_a_new_file_appears_only_when_committed(storage: Storage) -> None:
    new = storage.create()
    assert new.write(b"hello ") == 6
    assert new.write_many([memoryview(b"wor"), b"ld"]) == 5
    assert new.tell() == 11
    assert not storage.exists("a/b/c.bin")
    assert storage.list("a") == []
    new.commit("a/b/c.bin")
    assert storage.exists("a/b/c.bin")
    assert storage.read("a/b/c.bin") == b"hello world"
    assert storage.size("a/b/c.bin") == 11
    assert storage.list("a") == ["a/b/c.bin"]


def test_an_aborted_file_leaves_nothing(storage: Storage) -> None:
    new = storage.create(bulk=True)
    new.write(b"x" * 100)
    new.abort()
    assert storage.list("") == []
    assert storage.tmp_files() == []


def test_a_large_file_round_trips(storage: Storage) -> None:
    data = bytes(range(256)) * (20 * 4096 + 7)  # over 16 MiB: spooled to disk on S3
    new = storage.create(bulk=True)
    for i in range(0, len(data), 1 << 20):
        new.write(memoryview(data)[i : i + (1 << 20)])
    new.commit("packs/ab/big.pack")
    assert storage.size("packs/ab/big.pack") == len(data)
    assert storage.read("packs/ab/big.pack", 12_345_678, 100) == data[12_345_678:12_345_778]


def test_reads_of_ranges_and_past_the_end(storage: Storage) -> None:
    storage.write_atomic("f", bytes(range(256)))
    assert storage.read("f") == bytes(range(256))
    assert storage.read("f", 10, 5) == bytes(range(10, 15))
    assert storage.read("f", 250) == bytes(range(250, 256))
    assert storage.read("f", 250, 100) == bytes(range(250, 256))  # short at its end
    assert storage.read("f", 256, 10) == b""
    assert storage.read("f", 0, 0) == b""
    buf = bytearray(20)
    assert storage.read_into("f", 246, memoryview(buf)) == 10
    assert bytes(buf[:10]) == bytes(range(246, 256))


def test_a_missing_file_is_a_repository_error(storage: Storage) -> None:
    assert not storage.exists("nope")
    assert storage.mtime("nope") is None
    with pytest.raises(RepositoryError, match="nope"):
        storage.read("nope")
    with pytest.raises(RepositoryError, match="nope"):
        storage.size("nope")
    storage.remove("nope")  # removing what is gone is fine


def test_write_atomic_replaces_and_remove_removes(storage: Storage) -> None:
    before = time.time()
    storage.write_atomic("points/p.json", b"one")
    storage.write_atomic("points/p.json", b"two")
    assert storage.read("points/p.json") == b"two"
    mtime = storage.mtime("points/p.json")
    assert mtime is not None and mtime >= before - 2
    storage.remove("points/p.json")
    assert not storage.exists("points/p.json")
    assert storage.list("points") == []


def test_list_is_sorted_and_stays_inside_its_prefix(
    storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(s3, "LIST_PAGE", 2)  # S3: several pages of a listing
    for name in ("packs/b/2.pack", "packs/a/1.pack", "packs2/x", "packsx", "index/s.parquet"):
        storage.write_atomic(name, b"x")
    assert storage.list("packs") == ["packs/a/1.pack", "packs/b/2.pack"]
    assert storage.list("packs/a") == ["packs/a/1.pack"]
    assert storage.list("missing") == []
    assert storage.list("") == sorted(
        ["packs/b/2.pack", "packs/a/1.pack", "packs2/x", "packsx", "index/s.parquet"]
    )
    assert storage.list_dirs("packs") == ["packs/a", "packs/b"]
    assert storage.list_dirs("missing") == []
    storage.sync("packs")
    storage.remove_dir("missing")


def test_a_locks_age_is_judged_on_the_storages_clock(
    storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lock of another host whose own clock is an hour behind (its heartbeat says so) is
    alive while its file is fresh; judged by the heartbeat it was taken for dead (a prune
    would have removed what that backup uses)."""
    skewed = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(time.time() - 3600))
    info = locks.LockInfo("0123456789abcdef", "backup", False, "elsewhere", 1, skewed, skewed)
    storage.write_atomic(info.name, info.to_json())
    assert storage.age("nothing") is None
    (seen,) = locks.read_locks(storage)
    assert seen == info and seen.age is not None and -5 < seen.age < 60
    assert seen.stale() is None
    # Ten minutes later by the storage's clock (this machine's, for a local directory; on S3
    # only the server's clock counts, so the test moves the server's answer instead).
    if isinstance(storage, LocalStorage):
        then = time.time() - locks.STALE_S - 5
        os.utime(storage.path(info.name), (then, then))
    else:
        assert isinstance(storage, S3Storage)
        real = storage._head

        def late(name: str) -> dict[str, Any] | None:
            head = real(name)
            if head is not None:
                date = time.time() + locks.STALE_S + 5
                head["ResponseMetadata"]["HTTPHeaders"]["date"] = formatdate(date, usegmt=True)
            return head

        monkeypatch.setattr(storage, "_head", late)
    (seen,) = locks.read_locks(storage)
    assert (seen.stale() or "").startswith("no heartbeat for 60"), seen.stale()
    assert locks.remove_stale(storage) == [(seen, seen.stale())]


@pytest.mark.parametrize("name", ["/abs", "../up", "a/../../b"])
def test_names_outside_the_repository_are_refused(storage: Storage, name: str) -> None:
    with pytest.raises(RepositoryError, match="invalid repository object name"):
        storage.write_atomic(name, b"x")
    with pytest.raises(RepositoryError, match="invalid repository object name"):
        storage.read(name)


def test_local_copies_of_s3_files_are_bounded(
    s3_env: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Readers that need a path get a local copy (``local_copy``); the copies stay under
    COMB_S3_CACHE_MIB, the least recently used going first."""
    monkeypatch.setenv("COMB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("COMB_S3_CACHE_MIB", "1")
    storage = S3Storage.existing(f"s3://{s3_env.bucket()}/p")
    blobs = {f"index/{i}.parquet": bytes([i]) * 400_000 for i in range(3)}
    paths = {}
    for n, (name, data) in enumerate(blobs.items()):
        storage.write_atomic(name, data)
        paths[name] = Path(storage.local_copy(name))
        assert paths[name].read_bytes() == data
        assert str(paths[name]).startswith(storage.local_copies())
        os.utime(paths[name], (1000 + n, 1000 + n))  # their order of use
    first, *rest = blobs
    assert not paths[first].exists() and all(paths[n].exists() for n in rest)
    assert Path(storage.local_copy(first)).read_bytes() == blobs[first]  # fetched again
