"""``init --copy-keys-from`` (FORMAT.md 21.1, ``incompat`` ``shared-ids``): a repository that
shares another's chunk ids gives the same data the same ids, and ``comb copy`` between the two
reads none of the chunks the target holds already (``pipeline.jobs.copy_known``); every copied
point restores identical and verifies. The wrong uses are one-line errors."""

from __future__ import annotations

import filecmp
import json
from pathlib import Path

import pytest
from combtest import TEST_PASSWORD, CliRunner, ImageFactory, MiB, assert_one_line_error
from s3server import S3Server

from catalog.repo import Repository
from catalog.store.index import load_index
from pipeline.jobs import copy_known


def _ids(location: object) -> set[bytes]:
    repo = Repository.open(str(location), password=TEST_PASSWORD)
    return set(load_index(repo.storage, ["chunk_id"]).column("chunk_id").to_pylist())


def _copy(cli: CliRunner, *args: object) -> list[dict[str, object]]:
    res = cli("copy", *args, "--engine", "local", "--json")
    assert res.code == 0, res.err
    copied = json.loads(res.out)["copied"]
    assert isinstance(copied, list)
    return copied


def test_a_repository_made_with_copy_keys_from_gives_the_same_ids(
    cli: CliRunner, make_image: ImageFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    img = make_image(4 * MiB)
    img.random(0, 3 * MiB, seed=1)
    first, shared, other = tmp_path / "first", tmp_path / "shared", tmp_path / "other"
    assert cli("-r", first, "init", "--chunk-size", "16384").code == 0
    # The new repository has a password of its own; the first one's comes from COMB_FROM_*.
    monkeypatch.setenv("COMB_PASSWORD", "the new one")
    monkeypatch.setenv("COMB_FROM_PASSWORD", TEST_PASSWORD)
    res = cli("-r", shared, "init", "--copy-keys-from", first, "--json")
    assert res.code == 0, res.err
    doc = json.loads(res.out)
    assert doc["chunk_size"] == 16384 and doc["shares_chunk_ids_with"] == str(first)
    monkeypatch.setenv("COMB_PASSWORD", TEST_PASSWORD)
    monkeypatch.delenv("COMB_FROM_PASSWORD")
    assert cli("-r", other, "init", "--chunk-size", "16384").code == 0
    for repo in (first, other):
        assert cli("-r", repo, "backup", img.path, "--engine", "local").code == 0
    monkeypatch.setenv("COMB_PASSWORD", "the new one")
    assert cli("-r", shared, "backup", img.path, "--engine", "local").code == 0
    config = json.loads((shared / "config.json").read_text())
    assert config["features"]["incompat"] == ["encryption", "shared-ids"]
    new = Repository.open(str(shared), password="the new one")
    assert new.shares_chunk_ids(Repository.open(str(first), password=TEST_PASSWORD))
    shared_ids = set(load_index(new.storage, ["chunk_id"]).column("chunk_id").to_pylist())
    monkeypatch.setenv("COMB_PASSWORD", TEST_PASSWORD)
    assert len(shared_ids) == 192 and shared_ids == _ids(first)
    assert not shared_ids & _ids(other)  # (other keys: other ids)
    # The other keys stay the new repository's own: its password does not open the first.
    assert_one_line_error(
        cli("-r", first, "points", "--password-file", _file(tmp_path, "the new one")),
        "wrong password",
    )


def _file(tmp: Path, text: str) -> Path:
    path = tmp / "password"
    path.write_text(text)
    return path


def test_what_cannot_share_ids_is_refused_in_one_line(
    cli: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = tmp_path / "first"
    assert cli("-r", first, "init").code == 0
    new = tmp_path / "new"
    cases = [
        (("--chunk-size", "4096"), "chunk ids are shared only with one chunk size", 2),
        (("--encryption", "none"), "is encrypted", 2),
        (("--from-password-file", _file(tmp_path, "wrong")), "wrong password", 12),
    ]
    for extra, needle, code in cases:
        res = cli("-r", new, "init", "--copy-keys-from", first, *extra)
        assert_one_line_error(res, needle, code=code)
        assert not new.exists()  # refused before anything was written
    res = cli("-r", new, "init", "--from-password-file", _file(tmp_path, "x"))
    assert_one_line_error(res, "goes with --copy-keys-from", code=2)
    res = cli("-r", new, "init", "--copy-keys-from", tmp_path / "missing")
    assert_one_line_error(res, "does not exist", code=3)
    # A config whose feature flag and sealed key disagree, or whose key was tampered with.
    assert cli("-r", new, "init", "--copy-keys-from", first).code == 0
    path = new / "config.json"
    good = path.read_text()
    doc = json.loads(good)
    doc["features"]["incompat"] = ["encryption"]
    path.write_text(json.dumps(doc))
    assert_one_line_error(cli("-r", new, "points"), "shared-ids feature flag disagree")
    doc = json.loads(good)
    key = doc["encryption"]["id_key"]
    doc["encryption"]["id_key"] = ("A" if key[0] != "A" else "B") + key[1:]
    path.write_text(json.dumps(doc))
    assert_one_line_error(cli("-r", new, "points"), "shared chunk-id key", "fails authentication")


def _history(cli: CliRunner, repo: Path, make_image: ImageFactory, tmp: Path) -> list[Path]:
    """Source vm three times (the second changed in 64 KiB, the third back as the first), and
    source clone: vm's first image with 1 MiB of its own. The images end inside a chunk."""
    img = make_image(8 * MiB + 100)
    img.random(0, 6 * MiB, seed=1)
    img.random(8 * MiB, 100, seed=4)
    first = img.snapshot(tmp / "first.img")
    assert cli("-r", repo, "backup", img.path, "--source-name", "vm").code == 0
    img.random(MiB, 64 * 1024, seed=2)
    second = img.snapshot(tmp / "second.img")
    assert cli("-r", repo, "backup", img.path, "--source-name", "vm").code == 0
    img.write(MiB, first.read_bytes()[MiB : MiB + 64 * 1024])  # back as it was
    assert cli("-r", repo, "backup", img.path, "--source-name", "vm").code == 0
    clone = img.clone(tmp / "clone.img")
    clone.random(7 * MiB, MiB, seed=3)
    assert cli("-r", repo, "backup", clone.path, "--source-name", "clone").code == 0
    return [first, second, img.path, clone.path]


def test_a_copy_between_repositories_sharing_ids_reads_only_what_the_target_lacks(
    cli: CliRunner,
    make_image: ImageFactory,
    tmp_path: Path,
    s3_env: S3Server,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(copy_known, "WINDOW_CHUNKS", 48)  # steps of 3 leaves, runs across them
    local = tmp_path / "local"
    assert cli("-r", local, "init").code == 0
    images = _history(cli, local, make_image, tmp_path)
    offsite = f"s3://{s3_env.bucket()}/shared"
    assert cli("-r", offsite, "init", "--copy-keys-from", local).code == 0
    # The target holds the template already (backed up there on its own).
    assert cli("-r", offsite, "backup", images[0], "--source-name", "template").code == 0
    copied = _copy(cli, "--from", local, "--to", offsite)
    assert [(c["source"], c["mode"], c["bytes_read"]) for c in copied] == [
        ("vm", "full", 0),  # all of it in the target: nothing read
        ("vm", "changed-extents", 64 * 1024),  # the change only
        ("vm", "changed-extents", 0),  # changed back: the target has that
        ("clone", "full", MiB),  # its own MiB only
    ]
    assert [c["bytes_new"] for c in copied] == [0, 64 * 1024, 0, MiB]
    target = Repository.open(offsite, password=TEST_PASSWORD)
    copies = {p.copy_of: p for p in target.points() if p.copy_of}
    originals = sorted(Repository.open(str(local), password=TEST_PASSWORD).points(),
                       key=lambda p: (p.time, p.id))  # fmt: skip
    for point, image in zip(originals, images, strict=True):
        out = tmp_path / "out.img"
        assert cli("-r", offsite, "restore", copies[point.id].id, out).code == 0
        assert filecmp.cmp(out, image, shallow=False)
        out.unlink()
    res = cli("-r", offsite, "verify", "--read-data")
    assert res.code == 0 and "clean" in res.out, res.out + res.err
    # Back into a new local repository sharing the ids: the first point is all new there.
    back = tmp_path / "back"
    assert cli("-r", back, "init", "--copy-keys-from", offsite).code == 0
    copied = _copy(cli, "--from", offsite, "--to", back, "--source", "clone")
    assert [c["bytes_read"] for c in copied] == [7 * MiB + 100]  # (its zeros are not read)
    copied = _copy(cli, "--from", offsite, "--to", back, "--source", "vm")
    assert [c["bytes_read"] for c in copied] == [0, 64 * 1024, 0]
    for point in Repository.open(str(back), password=TEST_PASSWORD).points():
        original = next(p for p in originals if (p.source, p.time) == (point.source, point.time))
        out = tmp_path / "out.img"
        assert cli("-r", back, "restore", point.id, out).code == 0
        assert filecmp.cmp(out, images[originals.index(original)], shallow=False)
        out.unlink()
