"""A repository on S3 (a real server process: moto, tests/s3server.py), through the command
line: every byte of it goes through ``catalog.store.s3``; backups, restores and maintenance
behave as on a local directory, and a place or server comb cannot use is refused in one line."""

from __future__ import annotations

import filecmp
import json
import os
import time
from pathlib import Path

import pytest
from combtest import TEST_PASSWORD, CliRunner, ImageFactory, MiB, need_tool, point_ids
from fsimages import ext4_image
from nbdtest import run_tool, start
from s3server import S3Server, free_port, header_stripper

from catalog.repo import Repository
from catalog.store.s3 import S3Storage
from catalog.store.s3_client import REQUESTS
from drive.nbd.server import NbdServer
from pipeline import engines


def _image(make_image: ImageFactory):  # type: ignore[no-untyped-def]
    img = make_image(8 * MiB)
    img.random(0, 2 * MiB, seed=1)
    img.compressible(3 * MiB, 2 * MiB, seed=2)
    img.zeros(6 * MiB, MiB)
    img.take_changes()
    return img


def test_backup_restore_verify_and_prune_on_s3(
    cli: CliRunner, s3_env: S3Server, make_image: ImageFactory, tmp_path: Path
) -> None:
    repo = f"s3://{s3_env.bucket()}/backups/vm"
    assert cli("-r", repo, "init").code == 0
    img = _image(make_image)
    first_copy = img.snapshot(tmp_path / "first.img")
    res = cli("-r", repo, "backup", img.path, "--source-name", "vm")
    assert res.code == 0, res.err
    img.random(MiB, 64 * 1024, seed=3)  # an incremental from the change list
    changes = img.changes_file(tmp_path / "changes.json", img.take_changes())
    res = cli("-r", repo, "backup", img.path, "--source-name", "vm", "--changed-extents", changes)
    assert res.code == 0, res.err
    first, second = point_ids(cli, repo)
    for point, expected in ((first, first_copy), (second, img.path)):
        out = tmp_path / f"{point}.img"
        res = cli("-r", repo, "restore", point, out)
        assert res.code == 0, res.err
        assert filecmp.cmp(out, expected, shallow=False)
    res = cli("-r", repo, "verify")
    assert res.code == 0 and "clean" in res.out, res.out + res.err
    server = NbdServer(Repository.open(repo, password=TEST_PASSWORD), port=0)
    thread = start(server)
    try:  # the virtual drive reads the bucket: libnbd's nbdcopy copies the point
        got = tmp_path / "nbd.img"
        uri = f"nbd://127.0.0.1:{server.address[1]}/vm@{second}"
        done = run_tool(need_tool("nbdcopy"), uri, str(got))
        assert done.returncode == 0, done.stderr
        assert filecmp.cmp(got, img.path, shallow=False)
    finally:
        server.shutdown()
        thread.join(10)
    res = cli("-r", repo, "scrub")
    assert res.code == 0 and "clean" in res.out, res.out + res.err
    res = cli("-r", repo, "forget", first, "--prune")
    assert res.code == 0, res.err
    assert point_ids(cli, repo) == [second]
    out = tmp_path / "again.img"
    assert cli("-r", repo, "restore", "vm@latest", out).code == 0
    assert filecmp.cmp(out, img.path, shallow=False)
    assert cli("-r", repo, "verify").code == 0


def test_two_repositories_share_a_bucket_without_seeing_each_other(
    cli: CliRunner, s3_env: S3Server, make_image: ImageFactory
) -> None:
    bucket = s3_env.bucket()
    img = _image(make_image)
    for name in ("a", "ab"):  # one prefix starting the other
        assert cli("-r", f"s3://{bucket}/{name}", "init").code == 0
        assert cli("-r", f"s3://{bucket}/{name}", "backup", img.path).code == 0
    assert len(point_ids(cli, f"s3://{bucket}/a")) == 1
    assert len(point_ids(cli, f"s3://{bucket}/ab")) == 1
    res = cli("-r", f"s3://{bucket}/a", "prune")
    assert res.code == 0 and "removed 0 pack(s)" in res.out, res.out + res.err
    assert cli("-r", f"s3://{bucket}/ab", "verify").code == 0


def test_places_comb_cannot_use_are_refused_in_one_line(
    cli: CliRunner, s3_env: S3Server, make_image: ImageFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = s3_env.bucket()
    cases = [
        ("s3://comb-no-such-bucket/r", "init", "the bucket does not exist"),
        ("S3://comb-no-such-bucket/r", "init", "the bucket does not exist"),
        ("s3://No_Such/r", "init", "not a valid S3 bucket name"),
        ("s3://comb-no-such-bucket/r", "points", "the bucket does not exist"),
    ]
    s3_env.client().put_object(Bucket=bucket, Key="taken/file", Body=b"x")
    cases.append((f"s3://{bucket}/taken", "init", "is not empty"))
    assert cli("-r", f"s3://{bucket}/repo", "init").code == 0
    cases.append((f"s3://{bucket}/repo", "init", "already holds a comb repository"))
    cases.append((f"s3://{bucket}/empty", "points", "is not a comb repository"))
    res = cli("-r", "gs://bucket/r", "init")  # not taken for a relative path
    assert res.code == 2 and "unknown repository location gs://" in res.err, res.err
    for repo, command, message in cases:
        res = cli("-r", repo, command)
        assert res.code == 3, (repo, command, res.out, res.err)
        assert message in res.err and res.err.count("\n") == 1, res.err
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    res = cli("-r", f"s3://{bucket}/repo", "points")
    assert res.code == 3 and "cannot reach the S3 endpoint" in res.err, res.err
    assert res.err.count("\n") == 1


@pytest.mark.parametrize(
    ("header", "message"),
    [("If-None-Match", "ignores If-None-Match"), ("Range", "ignored the byte range")],
)
def test_a_server_that_ignores_preconditions_or_ranges_is_refused(
    cli: CliRunner, s3_env: S3Server, monkeypatch: pytest.MonkeyPatch, header: str, message: str
) -> None:
    bucket = s3_env.bucket()
    with header_stripper(s3_env.endpoint, header) as lying:
        monkeypatch.setenv("AWS_ENDPOINT_URL", lying)
        res = cli("-r", f"s3://{bucket}/repo", "init")
    assert res.code == 3, res.out + res.err
    assert message in res.err and res.err.count("\n") == 1, res.err
    # nothing of a repository was left behind
    assert s3_env.client().list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0


@pytest.mark.ray
def test_ray_workers_write_their_packs_to_the_bucket(
    cli: CliRunner, s3_env: S3Server, make_image: ImageFactory, tmp_path: Path
) -> None:
    """No shared filesystem: each Ray worker uploads its own packs (the embedded Ray's workers
    inherit the AWS variables, as a cluster's nodes would need them)."""
    repo = f"s3://{s3_env.bucket()}/r"
    assert cli("-r", repo, "init").code == 0
    img = _image(make_image)
    res = cli("-r", repo, "backup", img.path, "--engine", "ray", "--source-name", "vm")
    assert res.code == 0, res.err
    out = tmp_path / "out.img"
    assert cli("-r", repo, "restore", "vm@latest", out).code == 0
    assert filecmp.cmp(out, img.path, shallow=False)
    assert cli("-r", repo, "verify").code == 0


def test_the_configuration_file_names_an_s3_repository(
    cli: CliRunner, s3_env: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An s3:// location in the file is taken as it is (a path would be relative to it)."""
    repo = f"s3://{s3_env.bucket()}/from-config"
    assert cli("-r", repo, "init").code == 0
    path = tmp_path / "comb.toml"
    path.write_text(f'repository = "{repo}"\n')
    monkeypatch.setenv("COMB_CONFIG", str(path))
    res = cli("points", "--json")
    assert res.code == 0, res.err


def test_prune_removes_the_objects_of_forgotten_data(
    cli: CliRunner, s3_env: S3Server, make_image: ImageFactory, tmp_path: Path
) -> None:
    bucket = s3_env.bucket()
    repo = f"s3://{bucket}/r"
    assert cli("-r", repo, "init").code == 0
    img = make_image(4 * MiB)
    img.random(0, 2 * MiB, seed=1)
    assert cli("-r", repo, "backup", img.path, "--source-name", "vm").code == 0
    img.random(0, 2 * MiB, seed=2)  # all new data: the first point's pack becomes garbage
    assert cli("-r", repo, "backup", img.path, "--source-name", "vm").code == 0
    first, _ = point_ids(cli, repo)

    def objects(prefix: str) -> set[str]:
        found = s3_env.client().list_objects_v2(Bucket=bucket, Prefix=f"r/{prefix}/")
        return {o["Key"] for o in found.get("Contents", ())}

    packs, parity = objects("packs"), objects("parity")
    before = REQUESTS.snapshot()
    res = cli("-r", repo, "forget", first, "--prune", "--json")
    assert res.code == 0, res.err
    removed = json.loads(res.out)["prune"]["packs_removed"]
    assert removed >= 1
    # Three HEADs per pack removed (its size in each of the prune's two plans, its age against
    # the record): none for a retention date in a repository without Object Lock.
    heads = REQUESTS.snapshot().get("HeadObject packs", 0) - before.get("HeadObject packs", 0)
    assert heads <= 3 * removed, (heads, removed)
    assert objects("packs") < packs and len(objects("packs")) == len(packs) - removed
    assert len(objects("parity")) == len(parity) - removed
    out = tmp_path / "out.img"
    assert cli("-r", repo, "restore", "vm@latest", out).code == 0
    assert filecmp.cmp(out, img.path, shallow=False)
    res = cli("-r", repo, "verify")
    assert res.code == 0 and "clean" in res.out, res.out + res.err


def test_analytics_read_local_copies_of_the_catalog(
    cli: CliRunner,
    s3_env: S3Server,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Queries, reports, stats and the files view read the catalog's Parquet files from local
    copies (downloaded once, checked against their names at each use): the same answers as
    on a local directory, and a damaged copy is fetched again."""
    monkeypatch.setenv("COMB_CACHE_DIR", str(tmp_path / "cache"))
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "hello.txt").write_text("hello\n")
    image = ext4_image(tree, tmp_path / "fs.img", size_mb=8)
    answers = {}
    on_s3 = f"s3://{s3_env.bucket()}/r"
    plain = f"s3://{s3_env.bucket()}/plain"  # (DuckDB's own Parquet reader, on the copies)
    for repo, init in ((on_s3, ()), (plain, ("--encryption", "none")), (str(tmp_path / "l"), ())):
        assert cli("-r", repo, "init", *init).code == 0
        for _ in range(2):
            res = cli("-r", repo, "backup", image, "--source-name", "fs")
            assert res.code == 0, res.err
        got = []
        for sql in (
            "SELECT count(*) FROM chunks",
            "SELECT count(*), sum(length) FROM manifests",
            "SELECT count(*) FROM changes",
            "SELECT decode(path) FROM files WHERE decode(path) LIKE '%hello.txt' ORDER BY point_id",
        ):
            res = cli("-r", repo, "query", sql, "--format", "csv")
            assert res.code == 0 and res.err == "", (sql, res.err)
            got.append(res.out)
        for command in (("stats",), ("report", "unique"), ("dashboard", tmp_path / "d.html")):
            res = cli("-r", repo, *command)
            assert res.code == 0, (command, res.err)
        answers[repo] = got
    assert answers[on_s3] == answers[plain] == answers[str(tmp_path / "l")]
    assert "hello.txt" in answers[on_s3][3]
    copies = list((tmp_path / "cache" / "s3").rglob("*.parquet"))
    assert copies
    for copy in copies:
        copy.write_bytes(b"damaged" + copy.read_bytes()[7:])
    sql = "SELECT count(*) FROM chunks"
    res = cli("-r", on_s3, "query", sql, "--format", "csv")  # (each copy fetched again)
    assert res.code == 0 and res.err == "" and res.out == answers[on_s3][0], res.err


@pytest.mark.ray
def test_a_worker_that_cannot_reach_the_bucket_says_why(
    cli: CliRunner, s3_env: S3Server, make_image: ImageFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An actor whose ``__init__`` fails (here: handed an endpoint that does not answer) is
    reported with its own error, not as a worker "killed or out of memory"."""
    repo = f"s3://{s3_env.bucket()}/r"
    assert cli("-r", repo, "init").code == 0
    img = _image(make_image)
    assert cli("-r", repo, "backup", img.path).code == 0  # (an index for the actor to load)
    bad = {**engines.worker_env(), "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}
    monkeypatch.setattr(engines, "worker_env", lambda: {**bad, "AWS_MAX_ATTEMPTS": "1"})
    res = cli("-r", repo, "backup", img.path, "--engine", "ray")
    assert res.code == 3, res.err
    assert "cannot reach the S3 endpoint" in res.err and res.err.count("\n") == 1, res.err


def test_the_endpoint_can_be_given_as_an_option(
    cli: CliRunner, s3_env: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = f"s3://{s3_env.bucket()}/r"
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # (wrong)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    assert cli("-r", repo, "init", "--s3-endpoint", s3_env.endpoint).code == 0
    assert cli("--s3-endpoint", s3_env.endpoint, "-r", repo, "points").code == 0
    assert os.environ["AWS_ENDPOINT_URL"] != s3_env.endpoint  # (put back after the command)
    res = cli("-r", repo, "points", "--s3-endpoint", "127.0.0.1:9000")
    assert res.code == 2 and "http:// or https://" in res.err, res.err


def test_a_request_budget_spaces_the_requests(
    cli: CliRunner, s3_env: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--s3-max-requests-per-s (COMB_S3_MAX_REQUESTS_PER_S): a burst of one second's worth,
    then one request every 1/N s; a value that is not a positive number is a usage error."""
    repo = f"s3://{s3_env.bucket()}/r"
    assert cli("-r", repo, "init").code == 0
    monkeypatch.setenv("COMB_S3_MAX_REQUESTS_PER_S", "1000")  # (restored after the test)
    res = cli("-r", repo, "points", "--s3-max-requests-per-s", "0")
    assert res.code == 2 and "above 0" in res.err and res.err.count("\n") == 1, res.err
    took = {}
    for rate in ("1000", "20"):
        monkeypatch.setenv("COMB_S3_MAX_REQUESTS_PER_S", rate)
        storage = S3Storage.existing(repo)  # (a client of these settings)
        t0 = time.monotonic()
        for _ in range(40):
            storage.exists("config.json")
        took[rate] = time.monotonic() - t0
    # 20 a second: 20 at once, then 20 more at 20 a second, so at least 0.95 s. 1000 a
    # second never waits (40 is within the burst): only the server's time, well below that
    # on a loaded machine too (it was 0.28 s on a CI run with 2 busy cores).
    assert took["20"] >= 0.9 and took["1000"] < 0.9, took


READS = ("GetObject", "HeadObject")


def test_metadata_is_fetched_once_not_at_every_backup(
    cli: CliRunner,
    s3_env: S3Server,
    make_image: ImageFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A backup reads every index segment and every point document (one of each per earlier
    backup): through the local copies each is fetched once, so a backup's GETs of them do not
    grow with the history (uncached: one more of each per earlier backup). (Its GETs of file
    catalog documents still do: one per earlier point of the chain its catalog builds on, up
    to the chain's full listing.)"""
    monkeypatch.setenv("COMB_CACHE_DIR", str(tmp_path / "cache"))
    repo = f"s3://{s3_env.bucket()}/r"
    assert cli("-r", repo, "init").code == 0
    img = make_image(2 * MiB)
    gets, lists = [], []
    for seed in range(6):
        img.random(0, 64 * 1024, seed=seed)  # a new chunk each time: a new segment each time
        before = REQUESTS.snapshot()
        assert cli("-r", repo, "backup", img.path).code == 0
        after = REQUESTS.snapshot()
        gets.append({k: after[k] - before.get(k, 0) for k in after if k.split()[0] in READS})
        lists.append({k for k in after if k.startswith("List") and after[k] > before.get(k, 0)})
    for folder in ("index", "points"):
        counts = [g.get(f"GetObject {folder}", 0) for g in gets]
        assert counts[-1] <= counts[1], gets  # (uncached: one more GET per earlier backup)
    # The catalog's documents: one read each along the chain, and one look for the new
    # point's own (it read each twice, and the base's four times).
    files = [g.get("GetObject files", 0) + g.get("HeadObject files", 0) for g in gets]
    assert files[-1] <= files[1] + 4 and gets[-1].get("HeadObject files", 0) <= 1, gets
    before = REQUESTS.snapshot()
    out = tmp_path / "out.img"
    assert cli("-r", repo, "restore", f"{img.path}@latest", out).code == 0
    assert filecmp.cmp(out, img.path, shallow=False)
    after = REQUESTS.snapshot()
    lists.append({k for k in after if k.startswith("List") and after[k] > before.get(k, 0)})
    assert not any("ListObjectsV2 packs" in listed for listed in lists), lists  # no LIST of packs


def test_a_lost_pack_on_s3_is_reported_and_mended_by_repair_index(
    cli: CliRunner, s3_env: S3Server, make_image: ImageFactory, tmp_path: Path
) -> None:
    """A backup on S3 does not list ``packs/`` to learn which packs exist: a pack lost to
    damage is found by verify, ``repair index`` forgets its chunks, and a backup that reads
    them stores them again, so the earlier point is whole again."""
    bucket = s3_env.bucket()
    repo = f"s3://{bucket}/r"
    assert cli("-r", repo, "init").code == 0
    img = _image(make_image)
    assert cli("-r", repo, "backup", img.path, "--source-name", "vm").code == 0
    client = s3_env.client()
    packs = client.list_objects_v2(Bucket=bucket, Prefix="r/packs/")["Contents"]
    for obj in packs:
        client.delete_object(Bucket=bucket, Key=obj["Key"])
    res = cli("-r", repo, "verify")
    assert res.code != 0 and "is missing" in res.out + res.err, res.out + res.err
    assert "comb repair index" in res.out + res.err
    assert cli("-r", repo, "repair", "index").code == 0
    assert cli("-r", repo, "backup", img.path, "--source-name", "again").code == 0
    for name in ("vm", "again"):
        out = tmp_path / f"{name}.img"
        assert cli("-r", repo, "restore", f"{name}@latest", out).code == 0
        assert filecmp.cmp(out, img.path, shallow=False)
    assert cli("-r", repo, "verify").code == 0
