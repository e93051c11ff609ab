"""Encryption at rest: passwords (wrong, missing, from a file, typed at a terminal) and key
files (add, list, remove). The rest is in test_encryption.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from combtest import TEST_PASSWORD, CliRunner, assert_one_line_error

from catalog.store import crypto


def test_passwords_wrong_missing_from_file(
    cli: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = tmp_path / "repo"
    assert cli("-r", repo, "init").code == 0
    crypto.forget_unlocked()
    monkeypatch.setenv("COMB_PASSWORD", "not it")
    assert_one_line_error(cli("-r", repo, "points"), "wrong password", code=12)
    monkeypatch.delenv("COMB_PASSWORD")
    assert_one_line_error(cli("-r", repo, "points"), "needs a password", code=2)
    pw = tmp_path / "pw"
    pw.write_text(TEST_PASSWORD + "\n")
    assert cli("--password-file", pw, "-r", repo, "points").code == 0
    assert_one_line_error(
        cli("--password-file", tmp_path / "nope", "-r", repo, "points"), "password file", code=2
    )
    monkeypatch.setenv("COMB_PASSWORD", "")
    assert_one_line_error(cli("-r", tmp_path / "r2", "init"), "empty password", code=2)
    assert not (tmp_path / "r2" / "config.json").exists()


def test_key_add_list_remove(
    cli: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = tmp_path / "repo"
    assert cli("-r", repo, "init").code == 0
    first = crypto.key_ids(_storage(repo))
    monkeypatch.setenv("COMB_NEW_PASSWORD", "second password")
    res = cli("-r", repo, "key", "add")
    assert res.code == 0
    second = res.out.split()[-1]
    listed = json.loads(cli("-r", repo, "key", "list", "--json").out)
    assert {k["id"] for k in listed} == {*first, second}
    assert [k["id"] for k in listed if k["current"]] == first
    assert_one_line_error(cli("-r", repo, "key", "remove", first[0]), "your password", code=2)
    monkeypatch.setenv("COMB_PASSWORD", "second password")
    crypto.forget_unlocked()
    assert cli("-r", repo, "key", "remove", first[0][:6]).code == 0
    assert crypto.key_ids(_storage(repo)) == [second]
    assert_one_line_error(cli("-r", repo, "key", "remove", second), "your password", code=2)
    assert_one_line_error(cli("-r", repo, "key", "remove", "ffff"), "no key", code=2)
    monkeypatch.setenv("COMB_PASSWORD", TEST_PASSWORD)
    crypto.forget_unlocked()
    assert_one_line_error(cli("-r", repo, "points"), "wrong password", code=12)


def _storage(repo: Path):  # type: ignore[no-untyped-def]
    from catalog.store.storage import LocalStorage

    return LocalStorage(str(repo))
