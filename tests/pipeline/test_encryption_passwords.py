"""Encryption at rest: passwords (wrong, missing, from a file, typed at a terminal; the
repository takes one, the command line looks it up) and key files (add, list, remove). The rest
is in test_encryption.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from combtest import TEST_PASSWORD, CliRunner, assert_one_line_error

from catalog.errors import UsageError
from catalog.repo import Repository
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


def test_the_repository_takes_a_password_and_never_looks_one_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Repository.init and open use the password they are given: a string, or a source asked
    only when the repository is encrypted. COMB_PASSWORD is the command line's, not theirs."""
    asked: list[tuple[str, bool]] = []

    def source(location: str, confirm: bool) -> str:
        asked.append((location, confirm))
        return TEST_PASSWORD

    sealed = str(tmp_path / "sealed")
    Repository.init(sealed, password=source)
    assert asked == [(sealed, True)]  # a new repository's password: confirmed
    monkeypatch.setenv("COMB_PASSWORD", TEST_PASSWORD)  # (conftest sets it too)
    with pytest.raises(UsageError, match=r"needs a password \(none given\)"):
        Repository.open(sealed)
    with pytest.raises(UsageError, match="empty password"):
        Repository.open(sealed, password="")
    assert Repository.open(sealed, password=source).key_id is not None
    assert asked[-1] == (sealed, False)
    assert Repository.open(sealed, password=TEST_PASSWORD).key_id is not None
    with pytest.raises(UsageError, match="needs a password"):
        Repository.init(str(tmp_path / "unsaid"))
    assert not (tmp_path / "unsaid").exists()
    asked.clear()
    plain = str(tmp_path / "plain")
    Repository.init(plain, encryption="none", password=source)
    assert Repository.open(plain, password=source).key_id is None
    assert Repository.open(plain).points() == []
    assert asked == []  # a plain repository never asks


def test_cli_plain_repository_needs_no_password(
    cli: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("COMB_PASSWORD")
    repo = tmp_path / "plain"
    assert cli("-r", repo, "init", "--encryption", "none").code == 0
    res = cli("-r", repo, "points", "--json")
    assert res.code == 0, res.err


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
    listed = json.loads(cli("-r", repo, "key", "list", "--json").out)["keys"]
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
    from catalog.store.local import LocalStorage

    return LocalStorage(str(repo))


def test_a_damaged_key_file_is_damage_not_a_wrong_password(
    cli: CliRunner, repo_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One character of ``wrapped`` changed (still valid base64): the key no longer opens with
    the right password. Its check says it is damaged (exit 7), not a wrong password (exit 12)."""
    crypto.forget_unlocked()
    (key_file,) = (repo_path / crypto.KEYS_PREFIX).glob("*.json")
    doc = json.loads(key_file.read_text())
    wrapped = doc["wrapped"]
    doc["wrapped"] = ("B" if wrapped[10] != "B" else "C").join([wrapped[:10], wrapped[11:]])
    key_file.write_text(json.dumps(doc))
    res = cli("-r", repo_path, "points")
    assert_one_line_error(res, "its check does not match", code=7)
    assert "wrong password" not in res.err
    # With a second, intact key: a wrong password says which key file was skipped as damaged.
    monkeypatch.setenv("COMB_PASSWORD", "not the password")
    good = json.loads(
        crypto.make_key_file(
            json.loads((repo_path / "config.json").read_text())["id"], bytes(64), "other"
        )
    )
    (repo_path / crypto.key_name("f" * 16)).write_text(json.dumps(good))
    res = cli("-r", repo_path, "points")
    assert_one_line_error(res, "1 damaged key file(s) skipped", code=12)
