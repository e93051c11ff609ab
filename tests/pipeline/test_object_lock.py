"""S3 Object Lock (``init --object-lock DAYS``) on a real S3 server process (moto, which enforces
retention): packs, parity, manifests and point documents are written with a retention date, a
direct delete of a locked version is refused, ``forget`` keeps a point whose document is still
retained, ``prune`` keeps unused files until their retention ends and extends the retention of
what live points use. Time passing is played by shortening retention (governance mode lets the
test's account bypass it), as an administrator would."""

from __future__ import annotations

import filecmp
import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from combtest import CliRunner, ImageFactory, MiB, assert_one_line_error, point_ids
from s3server import S3Server

from catalog.store.s3 import S3Storage

PREFIX = "locked"


def _lock_bucket(server: S3Server) -> str:
    name = f"comb-lock-{int(time.time() * 1e6) % 10**9}"
    server.client().create_bucket(Bucket=name, ObjectLockEnabledForBucket=True)
    return name


def _keys(client: Any, bucket: str, folder: str) -> list[str]:
    got = client.list_objects_v2(Bucket=bucket, Prefix=f"{PREFIX}/{folder}/")
    return [o["Key"] for o in got.get("Contents", [])]


def _retain_until(client: Any, bucket: str, key: str) -> datetime | None:
    until: datetime | None = client.head_object(Bucket=bucket, Key=key).get(
        "ObjectLockRetainUntilDate"
    )
    return until


def _shorten(client: Any, bucket: str, keys: list[str]) -> None:
    """The retention of ``keys`` ends a second from now; then it has passed even by the
    server's ``Date``, which has whole seconds (so 2.5 s)."""
    soon = datetime.now(UTC) + timedelta(seconds=1)
    for key in keys:
        client.put_object_retention(
            Bucket=bucket,
            Key=key,
            Retention={"Mode": "GOVERNANCE", "RetainUntilDate": soon},
            BypassGovernanceRetention=True,
        )
    time.sleep(2.5)


def test_object_lock_needs_a_bucket_with_it(
    cli: CliRunner, s3_env: S3Server, tmp_path: Path
) -> None:
    plain = s3_env.bucket()
    res = cli("-r", f"s3://{plain}/r", "init", "--object-lock", "7")
    assert_one_line_error(res, f"bucket {plain} has no Object Lock")
    res = cli("-r", tmp_path / "r", "init", "--object-lock", "7")
    assert_one_line_error(res, "needs an s3:// repository", code=2)
    res = cli("-r", f"s3://{plain}/r", "init", "--object-lock-mode", "compliance")
    assert_one_line_error(res, "needs --object-lock DAYS", code=2)


def test_locked_points_survive_forget_and_prune_until_their_date(
    cli: CliRunner,
    s3_env: S3Server,
    make_image: ImageFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client = s3_env.client()
    bucket = _lock_bucket(s3_env)
    repo = f"s3://{bucket}/{PREFIX}"
    res = cli("-r", repo, "init", "--object-lock", "1", "--json")
    assert res.code == 0, res.err
    assert json.loads(res.out)["object_lock"] == {"days": 1, "mode": "GOVERNANCE"}
    # Object Lock means versioning: without a rule expiring old versions, prune frees nothing.
    assert res.err.count("\n") == 1 and "keeps every version" in res.err, res.err
    img = make_image(4 * MiB)
    img.random(0, 2 * MiB, seed=1)
    assert cli("-r", repo, "backup", img.path, "--engine", "local", "--no-files").code == 0
    img.random(0, 2 * MiB, seed=2)  # nothing in common with the first point
    assert cli("-r", repo, "backup", img.path, "--engine", "local", "--no-files").code == 0
    first, second = point_ids(cli, repo)

    # What cannot be rebuilt is locked for a day; the index is not (repair index rebuilds it).
    pack = _keys(client, bucket, "packs")[0]
    until = _retain_until(client, bucket, pack)
    assert until is not None
    assert abs((until - datetime.now(UTC)).total_seconds() - 86400) < 600
    for folder in ("parity", "manifests", "points", "keys"):
        assert all(_retain_until(client, bucket, k) for k in _keys(client, bucket, folder))
    assert _retain_until(client, bucket, f"{PREFIX}/config.json")
    assert not any(_retain_until(client, bucket, k) for k in _keys(client, bucket, "index"))
    version = client.head_object(Bucket=bucket, Key=pack)["VersionId"]
    with pytest.raises(Exception, match="AccessDenied"):
        client.delete_object(Bucket=bucket, Key=pack, VersionId=version)

    # forget keeps a point younger than the period; once older, prune keeps its data while
    # its retention lasts (two days pass for the documents' ages: the server's clock is not
    # the test's to move).
    res = cli("-r", repo, "forget", first, "--json")
    assert res.code == 0 and first in json.loads(res.out)["held_by_object_lock"], res.out
    assert point_ids(cli, repo) == [first, second]
    real_age = S3Storage.age
    with monkeypatch.context() as later:
        later.setattr(S3Storage, "age", lambda self, n: (real_age(self, n) or 0) + 2 * 86400)
        assert cli("-r", repo, "forget", first).code == 0
    packs = set(_keys(client, bucket, "packs"))
    res = cli("-r", repo, "prune", "--json")
    doc = json.loads(res.out)
    assert res.code == 0 and doc["held_by_object_lock"] >= 1 and doc["packs_removed"] == 0, doc
    assert set(_keys(client, bucket, "packs")) == packs

    # Every retention ends: prune frees the first point's data and gives the second's a day
    # (and says nothing of versions: a lifecycle rule expires the old ones now).
    rule = {"ID": "old", "Status": "Enabled", "Filter": {"Prefix": ""},
            "NoncurrentVersionExpiration": {"NoncurrentDays": 1}}  # fmt: skip
    client.put_bucket_lifecycle_configuration(
        Bucket=bucket, LifecycleConfiguration={"Rules": [rule]}
    )
    everything = [o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]]
    _shorten(client, bucket, [k for k in everything if _retain_until(client, bucket, k)])
    res = cli("-r", repo, "prune", "--json")
    doc = json.loads(res.out)
    assert res.code == 0 and doc["packs_removed"] >= 1 and doc["held_by_object_lock"] == 0, doc
    assert "keeps every version" not in res.err, res.err
    assert doc["retention_extended"] >= 3, doc  # the second point's pack, manifests, document
    kept = _keys(client, bucket, "packs")
    assert kept and all(
        (_retain_until(client, bucket, k) or datetime.now(UTC))
        > datetime.now(UTC) + timedelta(hours=23)
        for k in kept
    )
    out = tmp_path / "second.img"
    assert cli("-r", repo, "restore", second, out).code == 0
    assert filecmp.cmp(out, img.path, shallow=False)
    res = cli("-r", repo, "verify", "--read-data")
    assert res.code == 0 and "clean" in res.out, res.out + res.err


def test_undelete_brings_back_what_was_deleted_or_replaced_since(
    cli: CliRunner, s3_env: S3Server, make_image: ImageFactory, tmp_path: Path
) -> None:
    """Someone holding the credentials deletes every object of the repository (S3 keeps the
    locked versions under delete markers) and overwrites a point document; ``repair undelete``
    brings the repository back as it was, and what was made after ``--since`` stays deleted."""
    client = s3_env.client()
    bucket = _lock_bucket(s3_env)
    repo = f"s3://{bucket}/{PREFIX}"
    assert cli("-r", repo, "init", "--object-lock", "1").code == 0
    img = make_image(4 * MiB)
    img.random(0, 2 * MiB, seed=1)
    assert cli("-r", repo, "backup", img.path, "--source-name", "vm", "--no-files").code == 0
    (vm_point,) = point_ids(cli, repo)
    time.sleep(1.1)  # (S3 times objects to the second)
    since = datetime.now(UTC).isoformat()
    time.sleep(1.1)
    before = img.snapshot(tmp_path / "before.img")
    img.random(2 * MiB, MiB, seed=2)
    assert cli("-r", repo, "backup", img.path, "--source-name", "later", "--no-files").code == 0
    point_doc = f"{PREFIX}/points/{vm_point}.json"
    client.put_object(Bucket=bucket, Key=point_doc, Body=b"{}")  # replaced
    for folder in ("", "packs", "parity", "manifests", "index", "points", "keys", "locks"):
        for key in _keys(client, bucket, folder) if folder else [f"{PREFIX}/config.json"]:
            client.delete_object(Bucket=bucket, Key=key)  # a delete marker on each
    assert cli("-r", repo, "points").code == 3  # no repository there any more

    res = cli("-r", repo, "repair", "undelete", "--since", since, "--dry-run", "--json")
    assert res.code == 0, res.err
    dry = json.loads(res.out)
    assert dry["dry_run"] and dry["undeleted"] and dry["left"], dry
    assert dry["reverted"] == [f"points/{vm_point}.json"], dry
    assert cli("-r", repo, "points").code == 3  # a dry run changes nothing
    res = cli("-r", repo, "repair", "undelete", "--since", since)
    assert res.code == 0 and "brought back" in res.out, res.err
    res = cli("-r", repo, "repair", "undelete", "--since", since, "--json")
    again = json.loads(res.out)
    assert res.code == 0 and not again["undeleted"] and not again["reverted"], again  # done

    res = cli("-r", repo, "points", "--json")
    assert res.code == 0, res.err
    assert {p["source"] for p in json.loads(res.out)["points"]} == {"vm"}
    assert cli("-r", repo, "verify").code == 0
    out = tmp_path / "out.img"
    assert cli("-r", repo, "restore", "vm@latest", out).code == 0
    assert filecmp.cmp(out, before, shallow=False)
    for key in _keys(client, bucket, "points"):  # what came back keeps its retention
        assert _retain_until(client, bucket, key) is not None

    assert_one_line_error(cli("-r", repo, "repair", "undelete"), "--since", code=2)
    assert_one_line_error(
        cli("-r", tmp_path / "local", "repair", "undelete", "--since", since), "s3://", code=2
    )


def test_compliance_mode_holds_even_against_the_account_itself(
    cli: CliRunner, s3_env: S3Server, make_image: ImageFactory
) -> None:
    """Compliance mode: a delete of a locked version is refused even with the governance
    bypass. (moto does not refuse shortening a compliance retention, which S3 does: that is
    not tested here.)"""
    client = s3_env.client()
    bucket = _lock_bucket(s3_env)
    repo = f"s3://{bucket}/{PREFIX}"
    res = cli(
        "-r", repo, "init", "--object-lock", "1", "--object-lock-mode", "compliance", "--json"
    )
    assert res.code == 0 and json.loads(res.out)["object_lock"]["mode"] == "COMPLIANCE", res.out
    img = make_image(2 * MiB)
    img.random(0, MiB, seed=1)
    assert cli("-r", repo, "backup", img.path, "--no-files").code == 0
    (point,) = point_ids(cli, repo)
    for key in (*_keys(client, bucket, "packs"), f"{PREFIX}/points/{point}.json"):
        head = client.head_object(Bucket=bucket, Key=key)
        assert head["ObjectLockMode"] == "COMPLIANCE", key
        with pytest.raises(Exception, match="AccessDenied"):
            client.delete_object(
                Bucket=bucket, Key=key, VersionId=head["VersionId"], BypassGovernanceRetention=True
            )
    res = cli("-r", repo, "forget", point, "--json")
    assert res.code == 0 and point in json.loads(res.out)["held_by_object_lock"], res.out
