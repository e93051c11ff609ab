"""Parity end to end: real packs corrupted (bit flips, whole ranges, within and beyond the
limit, the parity file, a missing parity file); ``scrub --repair`` heals exactly what the stated
limit covers (FORMAT.md 20), reports exactly the rest, and restores are byte-identical. A parity
file that is not the pack's (forged over other bytes, or another pack's) never heals it."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import pytest
from combtest import (
    TEST_PASSWORD,
    CliRunner,
    MiB,
    api_backup,
    assert_intact,
    assert_one_line_error,
    assert_restores,
    flip_byte,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from catalog.maint import prune as pruning
from catalog.maint.scrub import scrub
from catalog.repo import Repository
from catalog.store.packs import pack_name, parse_pack
from catalog.store.parity import ParityGeometry, parity_name, parse_parity, write_parity
from catalog.store.points import point_name

K, M, S = 4, 2, 64 * 1024  # 256 KiB stripes: a 3 MiB pack has 12
GEOMETRY = ParityGeometry(K, M, S)


def _make(tmp_path: Path, make_image: Any, points: int = 2) -> tuple[Path, list[str], dict]:
    repo_path = tmp_path / "prepo"
    Repository.init(str(repo_path), parity=GEOMETRY, password=TEST_PASSWORD)
    img = make_image(4 * MiB, "p.img")
    ids, copies = [], {}
    for i in range(points):
        img.random(0, 3 * MiB, seed=40 + i)
        p = api_backup(repo_path, img.path, name="d")
        ids.append(p.id)
        copies[p.id] = tmp_path / f"pcopy{i}.img"
        copies[p.id].write_bytes(img.path.read_bytes())
    return repo_path, ids, copies


def _packs(repo_path: Path) -> list[str]:
    return sorted(p.name[: -len(".pack")] for p in (repo_path / "packs").rglob("*.pack"))


def _restores(repo_path: Path, ids: list[str], copies: dict, tmp_path: Path) -> None:
    assert_restores(repo_path, {pid: copies[pid] for pid in ids}, tmp_path)


def _corrupt(path: Path, ranges: list[tuple[int, int]]) -> None:
    original = path.read_bytes()
    data = bytearray(original)
    for lo, hi in ranges:
        for j in range(lo, min(hi, len(data))):
            data[j] = original[j] ^ 0x5A  # never a no-op, also where ranges overlap
    path.write_bytes(bytes(data))


def _expected_lost(repo_path: Path, pack: bytes, ranges: list[tuple[int, int]]) -> set[bytes]:
    """The chunks the stated limit does not cover: those with damaged bytes in a stripe that
    has more than M damaged shards (computed from the spec, not from the code)."""
    size = len(pack)
    lost_bytes: set[int] = set()
    for st_no in range(-(-size // (K * S))):
        base = st_no * K * S
        rest = size - base
        s = S if rest >= K * S else -(-rest // K)
        hits = [(lo, hi) for lo, hi in ranges if lo < min(base + K * s, size) and hi > base]
        shards = {
            i for i in range(K) for lo, hi in hits if lo < base + (i + 1) * s and hi > base + i * s
        }
        if len(shards) > M:
            for lo, hi in hits:
                lost_bytes.update(range(max(lo, base), min(hi, base + K * s, size)))
    out = set()
    # The repository is encrypted (the default).
    sealer = Repository.open(str(repo_path), password=TEST_PASSWORD).sealer
    for e in parse_pack(pack, "p", sealer=sealer):
        if any(e.offset <= b < e.offset + e.stored_len for b in lost_bytes):
            out.add(e.chunk_id)
    return out


def test_new_repository_has_parity_for_every_pack(tmp_path: Path, make_image: Any) -> None:
    repo_path, ids, copies = _make(tmp_path, make_image)
    cfg = json.loads((repo_path / "config.json").read_text())
    assert "parity" in cfg["features"]["ro_compat"] and cfg["parity"]["parity_shards"] == M
    for pid in _packs(repo_path):
        size = (repo_path / pack_name(pid)).stat().st_size
        par = (repo_path / parity_name(pid)).stat().st_size
        assert 0.5 * M / K * size < par < M / K * size + 4096
    rep = scrub(Repository.open(str(repo_path), password=TEST_PASSWORD))
    assert rep.parity and not rep.damaged and not rep.parity_problems


def test_bit_flips_and_ranges_within_the_limit_heal_in_place(
    cli: CliRunner, tmp_path: Path, make_image: Any
) -> None:
    repo_path, ids, copies = _make(tmp_path, make_image)
    pid = _packs(repo_path)[0]
    path = repo_path / pack_name(pid)
    original = path.read_bytes()
    rng = random.Random(7)
    ranges = [(0, 16)]  # the header
    for st_no in range(1, 10, 2):  # one whole shard-sized range per odd stripe, anywhere
        lo = st_no * K * S + rng.randrange(K * S - S)
        ranges.append((lo, lo + S))
    ranges += [(len(original) - 40, len(original))]  # the table and trailer
    ranges += [(2 * K * S + 3 * 1000, 2 * K * S + 3 * 1000 + 1)]  # a bit flip
    _corrupt(path, ranges)
    assert _expected_lost(repo_path, original, ranges) == set()
    res = cli("-r", repo_path, "scrub")
    line = assert_one_line_error(res, "healable from parity", code=7)
    assert "`comb scrub --repair` heals them from parity" in line
    res = cli("-r", repo_path, "scrub", "--repair", "--json")
    assert res.code == 0, res.err
    doc = json.loads(res.out)
    assert [h["action"] for h in doc["healed"]] == ["rebuilt from parity"]
    assert doc["unhealed"] == 0 and doc["quarantined"] == [] and doc["affected"] == []
    assert path.read_bytes() == original  # the exact bytes, in place
    _restores(repo_path, ids, copies, tmp_path)
    assert cli("-r", repo_path, "scrub").code == 0


def test_damage_beyond_parity_is_reported_exactly_and_isolated(
    cli: CliRunner, tmp_path: Path, make_image: Any
) -> None:
    repo_path, ids, copies = _make(tmp_path, make_image)
    pid = _packs(repo_path)[0]
    path = repo_path / pack_name(pid)
    original = path.read_bytes()
    ranges = [
        (K * S + 100, K * S + 100 + 3 * S),  # 3+ shards of stripe 1: beyond
        (5 * K * S + 10, 5 * K * S + 20),  # one shard of stripe 5: healed
    ]
    _corrupt(path, ranges)
    lost = _expected_lost(repo_path, original, ranges)
    assert lost
    res = cli("-r", repo_path, "scrub", "--repair", "--json")
    assert res.code == 7
    doc = json.loads(res.out)
    unhealed = {bytes.fromhex(d["chunk_id"]) for d in doc["damaged"] if not d["healable"]}
    assert unhealed == lost
    assert doc["unhealed"] == len(lost) and doc["quarantined"] == [pid]
    # the chunks in stripe 5 were rebuilt and copied, not lost
    assert {bytes.fromhex(d["chunk_id"]) for d in doc["damaged"] if d["healable"]}
    (aff,) = doc["affected"]
    assert aff["extents"] and aff["point"] in ids
    # Points that do not use the lost chunks restore; the next backup of the data heals all.
    repo = Repository.open(str(repo_path), password=TEST_PASSWORD)
    hurt = {aff["point"]}
    _restores(repo_path, [i for i in ids if i not in hurt], copies, tmp_path)
    img = tmp_path / "again.img"
    shutil.copyfile(copies[aff["point"]], img)
    api_backup(repo_path, img, name="d")
    _restores(repo_path, ids, copies, tmp_path)
    assert scrub(repo).damaged == []


def test_damaged_and_missing_parity_files_are_rewritten(
    cli: CliRunner, tmp_path: Path, make_image: Any
) -> None:
    repo_path, ids, copies = _make(tmp_path, make_image)
    a, b = _packs(repo_path)
    flip_byte(repo_path / parity_name(a), 24 + 5)  # a parity shard
    (repo_path / parity_name(b)).unlink()  # as after a crash between parity and pack, or loss
    res = cli("-r", repo_path, "scrub")
    assert_one_line_error(res, "2 pack(s) with missing or damaged parity", code=7)
    assert "damaged parity shard" in res.err and "has no parity file" in res.err
    res = cli("-r", repo_path, "scrub", "--repair")
    assert res.code == 0, res.err
    assert res.out.count("rewritten from the intact pack") == 2
    assert cli("-r", repo_path, "scrub").code == 0
    # damaged parity metadata and a damaged pack: beyond parity, reported, isolated
    raw = bytearray((repo_path / parity_name(a)).read_bytes())
    raw[-20] ^= 1  # the trailer's meta_hash: the metadata check fails
    (repo_path / parity_name(a)).write_bytes(bytes(raw))
    flip_byte(repo_path / pack_name(a), 20)
    res = cli("-r", repo_path, "scrub", "--repair")
    assert_one_line_error(res, "beyond parity", "isolated", code=7)
    assert "damaged metadata" in res.err, res.err


def _forge(tmp_path: Path, make_image: Any) -> tuple[Path, list[str], dict, str, bytes, int]:
    """A repository whose first pack has a forged parity file and damage it covers: the file
    is made by the code's own writer over other bytes (whole metadata, the right pack id, every
    shard hash matching its shard), so it rebuilds the damaged pack to those other bytes (the
    forged pack, returned with where it differs)."""
    repo_path, ids, copies = _make(tmp_path, make_image)
    repo = Repository.open(str(repo_path), password=TEST_PASSWORD)
    pid = _packs(repo_path)[0]
    path = repo_path / pack_name(pid)
    lo = K * S + S + 1000  # inside data shard 1 of stripe 1, inside a chunk
    edited = bytearray(path.read_bytes())
    edited[lo : lo + 64] = bytes(64)
    forged = bytes(edited)
    write_parity(repo.storage, GEOMETRY, forged, pid)  # committed under the pack's parity name
    assert parse_parity((repo_path / parity_name(pid)).read_bytes(), "p", pid).pack_id == pid
    _corrupt(path, [(lo + 100, lo + 200)])  # the same shard damaged: one shard to rebuild
    return repo_path, ids, copies, pid, forged, lo


def test_a_forged_self_consistent_parity_file_is_never_used_to_heal(
    cli: CliRunner, tmp_path: Path, make_image: Any
) -> None:
    """Only the pack's name (BLAKE3 of its bytes) can refuse what a forged parity file
    rebuilds (FORMAT.md 20, "Checks"): the pack is never replaced by those bytes."""
    repo_path, ids, copies, _pid, forged, lo = _forge(tmp_path, make_image)
    res = cli("-r", repo_path, "scrub", "--repair", "--json")
    assert res.code != 0, res.out
    doc = json.loads(res.out)
    assert [h["action"] for h in doc["healed"]] == ["not healable"], doc["healed"]
    assert doc["unhealed"] >= 1 and doc["affected"]
    stored = [p.read_bytes() for p in (repo_path / "packs").rglob("*.pack")]
    assert forged not in stored and all(forged[lo : lo + 200] not in b for b in stored)
    checked = cli("-r", repo_path, "verify", "--read-data")
    assert checked.code != 0 and "chunk" in checked.out + checked.err, checked
    hurt = {a["point"] for a in doc["affected"]}
    _restores(repo_path, [i for i in ids if i not in hurt], copies, tmp_path)


def test_a_forged_parity_file_is_named_as_the_reason(
    cli: CliRunner, tmp_path: Path, make_image: Any
) -> None:
    repo_path, _ids, _copies, pid, _forged, _lo = _forge(tmp_path, make_image)
    doc = json.loads(cli("-r", repo_path, "scrub", "--json").out)
    assert pid in doc["parity_problems"], doc
    doc = json.loads(cli("-r", repo_path, "scrub", "--repair", "--json").out)
    (healed,) = doc["healed"]
    assert "0 shard(s)" not in healed["why"] and "name" in healed["why"], healed


def test_another_packs_parity_file_is_reported_and_rewritten(
    cli: CliRunner, tmp_path: Path, make_image: Any
) -> None:
    """A genuine parity file copied under another pack's name: its own hashes all check, so
    only the pack id in its trailer shows it is not this pack's."""
    repo_path, ids, copies = _make(tmp_path, make_image)
    a, b = _packs(repo_path)
    shutil.copyfile(repo_path / parity_name(b), repo_path / parity_name(a))
    res = cli("-r", repo_path, "scrub")
    assert_one_line_error(res, "1 pack(s) with missing or damaged parity", code=7)
    assert f"belongs to pack {b[:16]}" in res.err, res.err
    assert cli("-r", repo_path, "scrub", "--repair").code == 0
    assert parse_parity((repo_path / parity_name(a)).read_bytes(), "p", a).pack_id == a
    assert cli("-r", repo_path, "scrub").code == 0


def test_prune_removes_parity_and_repack_writes_it(tmp_path: Path, make_image: Any) -> None:
    repo_path = tmp_path / "prepo"
    Repository.init(str(repo_path), parity=GEOMETRY, password=TEST_PASSWORD)
    img = make_image(4 * MiB, "p.img")
    img.random(MiB, 3 * MiB, seed=1)  # leaves 1-3 of the disk: 0-2 of the first leaves file
    first = api_backup(repo_path, img.path, name="d")
    img.random(2 * MiB, 2 * MiB, seed=2)  # the first pack keeps 1 MiB of 3 live: repacked
    second = api_backup(repo_path, img.path, name="d")
    copy = tmp_path / "c.img"
    copy.write_bytes(img.path.read_bytes())
    orphan = repo_path / parity_name("ee" * 32)  # as left by a crash before its pack's commit
    orphan.parent.mkdir(parents=True, exist_ok=True)  # (a real pack may start ee too)
    shutil.copyfile(repo_path / parity_name(_packs(repo_path)[0]), orphan)
    repo = Repository.open(str(repo_path), password=TEST_PASSWORD)
    repo.storage.remove(point_name(first.id))
    res = pruning.prune(repo)
    assert res.repacked.new_packs == 1 and len(res.plan.packs) == 1
    parities = sorted(p.name[: -len(".parity")] for p in (repo_path / "parity").rglob("*.parity"))
    assert parities == _packs(repo_path)
    rep = scrub(Repository.open(str(repo_path), password=TEST_PASSWORD))
    assert not rep.parity_problems and not rep.damaged
    assert_intact(repo_path, {second.id: copy}, tmp_path)


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    data=st.lists(
        st.tuples(st.integers(0, 3 * MiB), st.sampled_from([1, 7, 512, 4096, S, 2 * S + 3])),
        min_size=1,
        max_size=6,
    )
)
def test_any_damage_heals_within_the_limit_and_reports_exactly_the_rest(
    tmp_path_factory: pytest.TempPathFactory, template: Path, data: list[tuple[int, int]]
) -> None:
    work = tmp_path_factory.mktemp("h") / "repo"
    shutil.copytree(template, work)
    pid = _packs(work)[0]
    path = work / pack_name(pid)
    original = path.read_bytes()
    ranges = [(lo, lo + n) for lo, n in data if lo < len(original)]
    if not ranges:
        return
    _corrupt(path, ranges)
    lost = _expected_lost(work, original, ranges)
    rep = scrub(Repository.open(str(work), password=TEST_PASSWORD), repair=True)
    assert {d.chunk_id for d in rep.unhealed if d.chunk_id} == lost
    if not lost and not any(d.pack == pid and not d.chunk_id for d in rep.unhealed):
        assert path.read_bytes() == original
    shutil.rmtree(work.parent)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One point of 3 MiB of random data in one pack, with parity (copied per example)."""
    from combtest import Image

    base = tmp_path_factory.mktemp("tpl")
    repo_path = base / "repo"
    Repository.init(str(repo_path), parity=GEOMETRY, password=TEST_PASSWORD)
    img = Image(base / "t.img", 3 * MiB)
    img.random(0, 3 * MiB, seed=3)
    api_backup(repo_path, img.path, name="t")
    return repo_path
