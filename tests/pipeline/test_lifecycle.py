"""forget, prune, locks and unlock: what goes, what stays, and that nothing still needed is
ever removed (also when a backup commits during a prune, and when a prune is killed)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from combtest import (
    TEST_PASSWORD,
    CliRunner,
    Image,
    MiB,
    api_backup,
    assert_intact,
    assert_one_line_error,
    assert_restores,
    assert_verified,
    flip_byte,
    point_ids,
)

from catalog.maint import gc
from catalog.maint import prune as pruning
from catalog.repo import Repository
from catalog.store import locks
from catalog.store.index import load_index
from catalog.store.packs import pack_name

# Each point rewrites 3 MiB from here: leaves 3-5 of the disk (1 MiB each), which a later
# point's leaves file holds as its leaves 0-2 (a file has only the leaves its backup changed).
DATA_AT = 3 * MiB


def _history(
    make_image: Any, repo_path: Path, tmp_path: Path
) -> tuple[Image, list[str], dict[str, Path]]:
    """Four points of one disk, each rewriting most of its data (from ``DATA_AT``); its first
    MiB is written once, so every point reads that leaf from the first point's leaves file,
    also once the first point is forgotten. Copies of each image kept."""
    img: Image = make_image(7 * MiB, "d.img")
    img.random(0, MiB, seed=99)
    ids, copies = [], {}
    for i in range(4):
        img.random(DATA_AT, 3 * MiB, seed=i)
        p = api_backup(repo_path, img.path, name="d")
        ids.append(p.id)
        copies[p.id] = img.snapshot(tmp_path / f"copy{i}.img")
    return img, ids, copies


def _kept(ids: list[str], copies: dict[str, Path]) -> dict[str, Path]:
    return {pid: copies[pid] for pid in ids}


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _json(res: Any) -> dict[str, Any]:
    assert res.code == 0, res.err
    return json.loads(res.out)  # type: ignore[no-any-return]


def test_forget_then_prune_frees_space_and_keeps_the_rest(
    cli: CliRunner, repo_path: Path, make_image: Any, tmp_path: Path
) -> None:
    _, ids, copies = _history(make_image, repo_path, tmp_path)
    before = _size(repo_path)
    dry = _json(cli("-r", repo_path, "forget", "--keep-last", "2", "--dry-run", "--json"))
    assert dry["forgotten"] == ids[:2] and dry["dry_run"]
    assert len(point_ids(cli, repo_path)) == 4
    done = _json(cli("-r", repo_path, "forget", "--keep-last", "2", "--json"))
    assert done["forgotten"] == ids[:2] and done["kept"] == 2
    pruned = _json(cli("-r", repo_path, "prune", "--json"))
    # Both roots and the second point's leaves file go; the first point's leaves file stays:
    # the kept points read their first leaf from it.
    assert pruned["packs_removed"] >= 1 and pruned["metadata_files_removed"] == 3
    after = _size(repo_path)
    assert after < before - 5 * MiB  # two points' 3 MiB of random data each, give or take
    assert_intact(repo_path, _kept(ids[2:], copies), tmp_path)
    again = _json(cli("-r", repo_path, "prune", "--json"))
    assert again["packs_removed"] == 0 and again["metadata_files_removed"] == 0
    assert_intact(repo_path, _kept(ids[2:], copies), tmp_path)
    # Block lists went with their files (catalog.store.blocks), and every file kept has its own.
    lists = {p.with_suffix(".parquet") for p in repo_path.rglob("*.blocks")}
    files = {*repo_path.glob("index/*.parquet"), *repo_path.glob("manifests/leaves/*.parquet")}
    assert lists == files
    config = json.loads((repo_path / "config.json").read_text())
    assert "locks" in config["features"]["ro_compat"]


def test_forget_by_id_and_source_and_overlay_bases(
    cli: CliRunner, repo_path: Path, make_image: Any, tmp_path: Path
) -> None:
    _, ids, copies = _history(make_image, repo_path, tmp_path)
    other: Image = make_image(MiB, "o.img")
    other.random(0, MiB, seed=9)
    o = api_backup(repo_path, other.path, name="o")
    copies[o.id] = other.path
    assert cli("-r", repo_path, "overlays", "create", "ov", ids[0]).code == 0
    res = _json(
        cli("-r", repo_path, "forget", "--source", "d", "--keep-last", "1", "--json", ids[3])
    )
    # keep-last 1 keeps ids[3] but it is named; ids[0] is an overlay's base; "o" is untouched
    assert res["forgotten"] == [ids[1], ids[2], ids[3]]
    assert res["held_by_overlays"] == {ids[0]: ["ov"]}
    left = set(point_ids(cli, repo_path))
    assert left == {ids[0], o.id}
    assert cli("-r", repo_path, "prune").code == 0
    assert_intact(repo_path, _kept([ids[0], o.id], copies), tmp_path)
    checked = cli("-r", repo_path, "verify", "--read-data")  # the overlay too
    assert checked.code == 0, checked.err


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        ([], "--keep-*"),
        (["--keep-last", "-1"], "--keep-last"),
        (["--source", "nope", "--keep-last", "1"], "no recovery point of source"),
        (["ffffffff"], "no recovery point"),
    ],
)
def test_forget_usage_errors(cli: CliRunner, repo_path: Path, args: list[str], needle: str) -> None:
    res = cli("-r", repo_path, "forget", *args)
    assert_one_line_error(res, needle)


def test_backup_during_prune_dedups_against_garbage(
    repo_path: Path, make_image: Any, tmp_path: Path
) -> None:
    """The interleaving that makes prune hard, step by step: prune marks; a point is forgotten
    and a backup then stores content that exists only in garbage packs (a dedup hit on
    garbage: it stores nothing); the exclusive phase must see that backup's point and keep
    those packs."""
    img, ids, copies = _history(make_image, repo_path, tmp_path)
    repo = Repository.open(str(repo_path), password=TEST_PASSWORD)
    marks = gc.Marks()
    gc.mark(repo, [p for p in repo.points() if p.id != ids[0]], marks)  # as if forgotten
    repacked = gc.repack(repo, marks)
    os.unlink(repo_path / "points" / f"{ids[0]}.json")
    img.random(DATA_AT, 3 * MiB, seed=0)  # the forgotten point's content again
    again = api_backup(repo_path, img.path, name="d")
    assert again.stats.bytes_new == 0  # deduplicated against the garbage
    with locks.locked(repo.storage, "prune", 5):
        gc.mark(repo, repo.points(), marks)
        plan = gc.plan(repo, marks, repacked.retired)
        gc.execute(repo, plan)
    copies[again.id] = copies[ids[0]]
    assert_intact(repo_path, _kept([again.id, *ids[1:]], copies), tmp_path)


@pytest.mark.parametrize("fail_at", range(0, 12))
def test_prune_killed_at_any_removal_loses_nothing(
    repo_path: Path, make_image: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail_at: int
) -> None:
    _, ids, copies = _history(make_image, repo_path, tmp_path)
    repo = Repository.open(str(repo_path), password=TEST_PASSWORD)
    os.unlink(repo_path / "points" / f"{ids[0]}.json")
    os.unlink(repo_path / "points" / f"{ids[1]}.json")
    real = type(repo.storage).remove
    calls = {"n": 0}

    def dying_remove(self: Any, name: str) -> None:
        if name.startswith("locks/"):
            return real(self, name)
        if calls["n"] == fail_at:
            raise KeyboardInterrupt  # killed here
        calls["n"] += 1
        return real(self, name)

    monkeypatch.setattr(type(repo.storage), "remove", dying_remove)
    try:
        pruning.prune(repo, wait_s=5)
        died = False
    except KeyboardInterrupt:
        died = True
    monkeypatch.setattr(type(repo.storage), "remove", real)
    for lk in locks.read_locks(repo.storage):  # a killed prune leaves its lock: remove it
        repo.storage.remove(lk.name)
    assert_restores(repo_path, _kept(ids[2:], copies), tmp_path)
    assert_verified(repo_path, clean=False)  # garbage may be left, never an error
    # The next prune finishes the job.
    pruning.prune(Repository.open(str(repo_path), password=TEST_PASSWORD), wait_s=5)
    assert_intact(repo_path, _kept(ids[2:], copies), tmp_path)
    if not died:
        assert fail_at >= calls["n"]


class ForeignLock:
    """A live lock held by another process (a sleeping child: the same host, a live pid)."""

    def __init__(self, repo: Repository, kind: str) -> None:
        self.proc = subprocess.Popen(["sleep", "60"])
        now = locks._now()
        self.info = locks.LockInfo(
            os.urandom(8).hex(),
            kind,
            kind in locks.EXCLUSIVE_KINDS,
            socket.gethostname(),
            self.proc.pid,
            now,
            now,
        )
        self.repo = repo
        repo.storage.write_atomic(self.info.name, json.dumps(self.info.__dict__).encode())

    def __enter__(self) -> ForeignLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.repo.storage.remove(self.info.name)
        self.proc.kill()
        self.proc.wait()


def test_locks_conflict_wait_and_stale(
    cli: CliRunner, repo_path: Path, make_image: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = Repository.open(str(repo_path), password=TEST_PASSWORD)
    monkeypatch.setenv(locks.WAIT_ENV, "0.3")
    garbage: Image = make_image(MiB, "garbage.img")
    garbage.random(0, MiB, seed=9)
    assert cli("-r", repo_path, "backup", garbage.path).code == 0
    assert cli("-r", repo_path, "forget", f"{garbage.path}@latest").code == 0
    with ForeignLock(repo, "backup"):
        res = cli("-r", repo_path, "prune")  # waits for the running backup, then gives up
        assert_one_line_error(res, "repository is locked", "backup (shared)", code=11)
        assert "waiting for the lock of backup" in res.err
        other = locks.acquire(repo.storage, "backup")  # shared locks coexist
        other.release()
        listed = cli("-r", repo_path, "locks")
        assert "backup (shared)" in listed.out and "alive" in listed.out
    img: Image = make_image(MiB, "x.img")
    # A prune holds `condemn` while it plans and waits, `remove` while it removes (FORMAT.md
    # 13): a backup waits for neither, a reader for `remove` only, and a repair excludes both.
    out = img.path.with_suffix(".out")
    with ForeignLock(repo, "condemn"):
        assert cli("-r", repo_path, "backup", img.path).code == 0
        res = cli("-r", repo_path, "restore", f"{img.path}@latest", out)
        assert res.code == 0, res.err
    with ForeignLock(repo, "remove"):
        assert cli("-r", repo_path, "backup", img.path).code == 0
        res = cli("-r", repo_path, "restore", f"{img.path}@latest", out)
        assert_one_line_error(res, "repository is locked", "remove (exclusive)", code=11)
    with ForeignLock(repo, "repair"):
        res = cli("-r", repo_path, "backup", img.path)  # waits while repair rewrites the index
        assert_one_line_error(res, "repository is locked", "repair (exclusive)", code=11)
        res = cli("-r", repo_path, "restore", f"{img.path}@latest", out)
        assert_one_line_error(res, "repair (exclusive)", code=11)
    with ForeignLock(repo, "condemn"):  # prunes exclude each other
        assert_one_line_error(cli("-r", repo_path, "prune"), "condemn (exclusive)", code=11)
    # One process never blocks itself (scrub --repair: shared to read, exclusive to repair).
    mine = locks.acquire(repo.storage, "backup")
    try:
        locks.acquire(repo.storage, "prune", 0.1).release()
    finally:
        mine.release()
    # A lock of a dead process is stale: ignored by everyone, removed by unlock --stale only.
    dead = subprocess.Popen(["true"])
    dead.wait()
    info = locks.LockInfo(
        "deadbeefdeadbeef", "prune", True, os.uname().nodename, dead.pid, "x", locks._now()
    )
    repo.storage.write_atomic(info.name, json.dumps(info.__dict__).encode())
    live = locks.acquire(repo.storage, "backup", 1)  # not blocked by the dead prune
    try:
        listed = cli("-r", repo_path, "locks")
        assert "STALE (process" in listed.out
        res = cli("-r", repo_path, "unlock", "--stale")
        assert res.code == 0 and "removed 1 stale lock" in res.out and "1 live lock" in res.out
        assert [lk.id for lk in locks.read_locks(repo.storage)] == [live.info.id]
    finally:
        live.release()
    assert_one_line_error(cli("-r", repo_path, "unlock"), "--stale", code=2)


def test_backups_wait_for_a_prune_that_does_not_condemn(
    cli: CliRunner, repo_path: Path, make_image: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A `prune` lock is a comb's whose prune removes without condemning (FORMAT.md 13):
    backups wait for it as they always did."""
    repo = Repository.open(str(repo_path), password=TEST_PASSWORD)
    monkeypatch.setenv(locks.WAIT_ENV, "0.3")
    img: Image = make_image(MiB, "x.img")
    with ForeignLock(repo, "prune"):
        res = cli("-r", repo_path, "backup", img.path)
        assert_one_line_error(res, "repository is locked", "prune (exclusive)", code=11)
    assert cli("-r", repo_path, "backup", img.path).code == 0


def test_heartbeat_age_makes_a_lock_stale(repo_path: Path) -> None:
    old = time.time() - locks.STALE_S - 5
    info = locks.LockInfo("0123456789abcdef", "backup", False, "elsewhere", 1, "x", "x")
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(old))
    assert info.__class__(**{**info.__dict__, "heartbeat": stamp}).stale() is not None
    fresh = info.__class__(**{**info.__dict__, "heartbeat": locks._now()})
    assert fresh.stale() is None  # another host: only the heartbeat can tell


def test_repair_index_rebuilds_it_from_the_packs(
    cli: CliRunner, repo_path: Path, make_image: Any, tmp_path: Path
) -> None:
    _, ids, copies = _history(make_image, repo_path, tmp_path)
    segments = sorted((repo_path / "index").glob("*.parquet"))
    assert len(segments) == 4
    segments[0].unlink()  # lost
    flip = segments[1].read_bytes()
    segments[1].write_bytes(flip[:100] + bytes([flip[100] ^ 1]) + flip[101:])  # damaged
    assert cli("-r", repo_path, "verify").code != 0
    res = cli("-r", repo_path, "repair", "index")
    assert res.code == 0, res.err
    assert "from 4 pack(s)" in res.out and "replaced 3 segment(s)" in res.out
    assert len(list((repo_path / "index").glob("*.parquet"))) == 1
    assert len(list((repo_path / "index").glob("*.blocks"))) == 1  # the old ones' went too
    assert_restores(repo_path, copies, tmp_path)
    res = cli("-r", repo_path, "verify", "--read-data")
    assert res.code == 0 and "clean" in res.out, res.err
    again = cli("-r", repo_path, "repair", "index")  # idempotent: the same segment
    assert again.code == 0 and "replaced 0 segment(s)" in again.out


def test_repair_index_reports_an_unreadable_pack(
    cli: CliRunner, repo_path: Path, make_image: Any, tmp_path: Path
) -> None:
    _, ids, copies = _history(make_image, repo_path, tmp_path)
    packs = sorted((repo_path / "packs").rglob("*.pack"))
    data = packs[0].read_bytes()
    packs[0].write_bytes(data[:-10])  # its table is gone
    res = cli("-r", repo_path, "repair", "index")
    assert_one_line_error(res, "1 pack(s) unreadable", code=7)
    assert "left out" in res.err and packs[0].name[:16] in res.err


def test_scrub_finds_isolates_and_a_backup_heals(
    cli: CliRunner, repo_path: Path, make_image: Any, tmp_path: Path
) -> None:
    """Without parity (init --parity-overhead 0); with it, see test_parity_scrub.py."""
    shutil.rmtree(repo_path)
    assert cli("-r", repo_path, "init", "--parity-overhead", "0").code == 0
    img, ids, copies = _history(make_image, repo_path, tmp_path)
    res = cli("-r", repo_path, "scrub")
    # (MiB/s, or GiB/s on a fast machine: 4 packs of 13 MiB take no time)
    assert res.code == 0 and "clean" in res.out and "iB/s" in res.out, res.err
    # Damage one chunk of the last point (its 3 MiB are in its own pack).
    repo = Repository.open(str(repo_path), password=TEST_PASSWORD)
    index = load_index(repo.storage)
    last = repo.resolve(ids[-1])
    leaf = repo.manifest(last).leaf_at(DATA_AT // MiB)
    victim = bytes(leaf.ids[0])
    row = next(r for r in index.to_pylist() if r["chunk_id"] == victim)
    flip_byte(repo_path / pack_name(row["pack"]), row["offset"] + 10)
    res = cli("-r", repo_path, "scrub")
    assert_one_line_error(res, "1 damaged chunk(s) in 1 pack(s)", "1 recovery point(s)", code=7)
    assert f"affected: point {ids[-1]} of d: extents {DATA_AT}+65536" in res.err
    res = cli("-r", repo_path, "scrub", "--repair")
    assert_one_line_error(res, "isolated", "heal when a backup", code=7)
    assert "intact chunk(s)" in res.out
    # The other points are whole; the damaged one is missing one chunk (an error, not garbage).
    assert_restores(repo_path, _kept(ids[:-1], copies), tmp_path)
    assert cli("-r", repo_path, "restore", ids[-1], tmp_path / "x.img").code != 0
    # The next backup of the same data stores the chunk again: the old point heals.
    img.path.write_bytes(copies[ids[-1]].read_bytes())
    api_backup(repo_path, img.path, name="d")
    assert_restores(repo_path, copies, tmp_path)
    res = cli("-r", repo_path, "scrub")
    assert res.code == 0 and "clean" in res.out, res.err
    assert cli("-r", repo_path, "verify", "--read-data").code == 0


def test_scrub_sample(cli: CliRunner, repo_path: Path, make_image: Any, tmp_path: Path) -> None:
    _history(make_image, repo_path, tmp_path)
    doc = _json(cli("-r", repo_path, "scrub", "--sample", "30", "--json"))
    assert 1 <= doc["packs_checked"] < doc["packs_total"] == 4
    assert_one_line_error(cli("-r", repo_path, "scrub", "--sample", "0"), "--sample", code=2)


def test_a_lock_released_while_locks_are_read_is_skipped(
    repo_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by the multi-process kill test: a lock listed, then released before it was read,
    made the reader fail ("cannot read locks/...: No such file"). It is simply gone."""
    repo = Repository.open(str(repo_path), password=TEST_PASSWORD)
    with locks.locked(repo.storage, "backup", command="test"):
        listed = repo.storage.list("locks")
    real_list = type(repo.storage).list
    monkeypatch.setattr(
        type(repo.storage),
        "list",
        lambda s, prefix: listed if prefix == "locks" else real_list(s, prefix),
    )
    assert locks.read_locks(repo.storage) == []


def test_locks_of_exited_unreaped_or_reused_pids_are_stale(repo_path: Path) -> None:
    """A killed comb not yet reaped by its parent (a zombie) holds no lock, nor does a pid that
    now belongs to a process started after the lock was taken."""
    host = socket.gethostname()
    zombie = subprocess.Popen(["true"])
    deadline = time.time() + 10
    while time.time() < deadline and __import__("psutil").Process(zombie.pid).status() != "zombie":
        time.sleep(0.01)
    now = locks._now()
    info = locks.LockInfo("a" * 16, "prune", True, host, zombie.pid, now, now)
    assert info.stale() == f"process {zombie.pid} has exited"
    zombie.wait()
    assert info.stale() == f"process {zombie.pid} is gone"
    old = "2001-01-01T00:00:00+00:00"  # this test's own pid, but a lock from long before
    reused = locks.LockInfo("b" * 16, "prune", True, host, os.getpid(), old, locks._now())
    assert "newer process" in str(reused.stale())
    live = locks.LockInfo("c" * 16, "prune", True, host, os.getpid(), now, locks._now())
    assert live.stale() is None
