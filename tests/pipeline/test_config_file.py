"""The configuration file (README.md, "Configuration"): each key takes effect, an option beats
its environment variable, which beats the file, which beats the built-in default; COMB_CONFIG
names another file; a bad file is a one-line usage error naming the file and the key; a missing
default file is silent. No test here reads the real home (tests/conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from combtest import TEST_PASSWORD, CliRunner, ImageFactory, assert_one_line_error

from catalog.errors import UsageError
from pipeline.cli import backup_cmd

WRONG_PASSWORD = 12


def _default_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str) -> Path:
    """``text`` as the default file, ``$XDG_CONFIG_HOME/comb/config.toml``."""
    home = tmp_path / "xdg"
    (home / "comb").mkdir(parents=True)
    path = home / "comb" / "config.toml"
    path.write_text(text)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home))
    return path


def _password_files(tmp_path: Path) -> tuple[Path, Path]:
    right, wrong = tmp_path / "right-pw", tmp_path / "wrong-pw"
    right.write_text(TEST_PASSWORD + "\n")
    wrong.write_text("not the password\n")
    return right, wrong


def test_missing_default_file_is_silent(
    cli: CliRunner, repo_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "nothing-here"))
    res = cli("-r", repo_path, "points")
    assert res.code == 0 and res.err == ""


def test_repository_key_and_its_precedence(
    cli: CliRunner, repo_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    nowhere = tmp_path / "nowhere"
    _default_file(tmp_path, monkeypatch, f'repository = "{repo_path}"\n')
    assert cli("points", "--json").code == 0  # the file's repository
    monkeypatch.setenv("COMB_REPO", str(nowhere))  # the variable beats the file
    assert_one_line_error(cli("points"), "nowhere")
    assert cli("-r", repo_path, "points").code == 0  # the option beats the variable
    monkeypatch.delenv("COMB_REPO")
    _default_file(tmp_path / "2", monkeypatch, f'repository = "{nowhere}"\n')
    assert cli("-r", repo_path, "points").code == 0  # the option beats the file


def test_relative_repository_is_relative_to_the_file(
    cli: CliRunner, repo_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "elsewhere" / "comb.toml"
    path.parent.mkdir()
    path.write_text('repository = "../repo"\n')
    monkeypatch.setenv("COMB_CONFIG", str(path))
    res = cli("points", "--json")
    assert res.code == 0, res.err
    assert json.loads(res.out) == {"points": []}


def test_password_file_key_and_its_precedence(
    cli: CliRunner, repo_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    right, wrong = _password_files(tmp_path)
    monkeypatch.delenv("COMB_PASSWORD")
    _default_file(tmp_path, monkeypatch, f'password-file = "{right}"\n')
    assert cli("-r", repo_path, "points").code == 0  # the file's password file
    _default_file(tmp_path / "2", monkeypatch, f'password-file = "{wrong}"\n')
    assert cli("-r", repo_path, "points").code == WRONG_PASSWORD
    monkeypatch.setenv("COMB_PASSWORD", TEST_PASSWORD)  # a password variable beats the file
    assert cli("-r", repo_path, "points").code == 0
    monkeypatch.delenv("COMB_PASSWORD")
    monkeypatch.setenv("COMB_PASSWORD_FILE", str(right))
    assert cli("-r", repo_path, "points").code == 0
    monkeypatch.setenv("COMB_PASSWORD_FILE", str(wrong))  # the option beats the variable
    assert cli("-r", repo_path, "points", "--password-file", right).code == 0
    assert cli("-r", repo_path, "points").code == WRONG_PASSWORD


@pytest.mark.parametrize(
    ("option", "env", "config", "chosen"),
    [
        (None, None, None, "ray"),  # the built-in default
        (None, None, "local", "local"),  # the file beats the default
        (None, "ray", "local", "ray"),  # the variable beats the file
        ("local", "ray", "ray", "local"),  # the option beats the variable
    ],
)
def test_engine_precedence(
    cli: CliRunner,
    repo_path: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    option: str | None,
    env: str | None,
    config: str | None,
    chosen: str,
) -> None:
    picked: list[str] = []

    def make_engine(name: str, *_: object) -> None:
        picked.append(name)
        raise UsageError("stop here")

    monkeypatch.setattr(backup_cmd, "make_engine", make_engine)
    monkeypatch.delenv("COMB_ENGINE")
    if env is not None:
        monkeypatch.setenv("COMB_ENGINE", env)
    if config is not None:
        _default_file(tmp_path, monkeypatch, f'engine = "{config}"\n')
    image = tmp_path / "disk.img"
    image.write_bytes(b"")
    res = cli("-r", repo_path, "backup", image, *(["--engine", option] if option else []))
    assert_one_line_error(res, "stop here")
    assert picked == [chosen]


def test_engine_key_and_keep_table_take_effect(
    cli: CliRunner,
    repo_path: Path,
    make_image: ImageFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("COMB_ENGINE")
    text = 'engine = "local"\n[keep]\nlast = 1\ndaily = 0\n'
    path = _default_file(tmp_path, monkeypatch, text)
    image = make_image(1 << 20)
    ids = []
    for seed in range(3):
        image.random(0, 1 << 16, seed=seed)
        res = cli("-r", repo_path, "backup", image.path, "--json")
        assert res.code == 0, res.err
        point = json.loads(res.out.splitlines()[-1])
        assert point["engine"] == "local"  # the file's engine
        ids.append(point["id"])

    def forget(*args: str) -> list[str]:
        """The ids a dry run would forget."""
        res = cli("-r", repo_path, "forget", "--dry-run", "--json", *args)
        assert res.code == 0, res.err
        return sorted(json.loads(res.out)["forgotten"])

    assert forget() == sorted(ids[:2])
    assert forget("--keep-last", "2") == [ids[0]]
    assert forget(ids[2]) == [ids[2]]  # point ids: no keep rules from the file
    res = cli("-r", repo_path, "forget", "--dry-run")
    assert res.code == 0 and f"keep rules from {path}: last 1, daily 0" in res.err
    path.write_text("[keep]\n")  # an empty table: nothing to go by, as without a file
    res = cli("-r", repo_path, "forget")
    assert_one_line_error(res, "--keep-", code=UsageError.exit_code)


def test_comb_config_names_the_file(
    cli: CliRunner, repo_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _default_file(tmp_path, monkeypatch, 'repository = "/nowhere"\n')
    named = tmp_path / "named.toml"
    named.write_text(f'repository = "{repo_path}"\n')
    monkeypatch.setenv("COMB_CONFIG", str(named))
    assert cli("points").code == 0  # the named file, not the default one
    monkeypatch.setenv("COMB_CONFIG", str(tmp_path / "missing.toml"))
    res = cli("-r", repo_path, "points")
    assert_one_line_error(res, "missing.toml", "COMB_CONFIG", code=UsageError.exit_code)


def test_home_config_without_xdg(
    cli: CliRunner, repo_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("XDG_CONFIG_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".config" / "comb").mkdir(parents=True)
    (tmp_path / ".config" / "comb" / "config.toml").write_text(f'repository = "{repo_path}"\n')
    assert cli("points").code == 0


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ("repository = \n", ["not valid TOML", "line 1"]),
        ("[keep\nlast = 1\n", ["not valid TOML"]),
        ('repo = "/x"\n', ["`repo`", "not a known key"]),
        ("[keep]\nbiweekly = 2\n", ["`keep.biweekly`", "not a known key"]),
        ("repository = 3\n", ["`repository`", "string"]),
        ('password-file = ""\n', ["`password-file`", "string"]),
        ('engine = "fast"\n', ["`engine`", "ray, local"]),
        ("engine = true\n", ["`engine`", "string"]),
        ('[keep]\ndaily = "7"\n', ["`keep.daily`", "integer"]),
        ("[keep]\ndaily = true\n", ["`keep.daily`", "integer"]),
        ("[keep]\ndaily = -1\n", ["`keep.daily`", "0 or more"]),
        ("keep = 3\n", ["`keep`", "table"]),
    ],
)
def test_bad_file_is_a_one_line_usage_error(
    cli: CliRunner,
    repo_path: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    text: str,
    needles: list[str],
) -> None:
    path = _default_file(tmp_path, monkeypatch, text)
    res = cli("-r", repo_path, "points")
    assert_one_line_error(res, str(path), *needles, code=UsageError.exit_code)


def test_commands_without_a_repository_ignore_the_file(
    cli: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _default_file(tmp_path, monkeypatch, "not toml at all\n")
    res = cli("completion", "bash")
    assert res.code == 0 and "complete -o default -F _comb comb" in res.out
