"""``comb completion bash|zsh``: a valid script, generated from the parser, that completes the
commands, their actions, their options and the choices of options (run in a real bash and a
real zsh)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from combtest import CliRunner, assert_one_line_error, need_tool

from catalog.errors import UsageError


@pytest.fixture
def script(cli: CliRunner, tmp_path: Path) -> Path:
    res = cli("completion", "bash")
    assert res.code == 0 and res.err == ""
    path = tmp_path / "comb.bash"
    path.write_text(res.out)
    return path


def _complete(bash: str, script: Path, *words: str) -> list[str]:
    """What the completion offers for ``words`` (the last one is being completed)."""
    quoted = " ".join("'" + w.replace("'", "'\\''") + "'" for w in words)
    program = (
        f"source '{script}'\n"
        f"COMP_WORDS=({quoted}); COMP_CWORD={len(words) - 1}\n"
        '_comb; printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    done = subprocess.run(
        [bash, "--norc", "--noprofile", "-c", program],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert done.stderr == ""
    return [line for line in done.stdout.splitlines() if line]


def test_bash_script_is_valid(script: Path) -> None:
    bash = need_tool("bash")
    subprocess.run([bash, "-n", str(script)], check=True, timeout=60)


def test_bash_completes_commands_options_and_choices(script: Path) -> None:
    bash = need_tool("bash")
    assert _complete(bash, script, "comb", "ba") == ["backup"]
    assert _complete(bash, script, "comb", "backup", "--eng") == ["--engine"]
    assert _complete(bash, script, "comb", "backup", "--engine", "") == ["ray", "local"]
    assert _complete(bash, script, "comb", "backup", "--engine", "=", "l") == ["local"]
    assert _complete(bash, script, "comb", "key", "") == ["list", "add", "remove"]
    assert _complete(bash, script, "comb", "key", "add", "--new") == ["--new-password-file"]
    assert _complete(bash, script, "comb", "--js") == ["--json"]
    assert "--keep-daily" in _complete(bash, script, "comb", "forget", "--keep-")
    # An option's value is not a command: `-r backup` names a repository.
    assert "init" in _complete(bash, script, "comb", "-r", "backup", "")
    assert _complete(bash, script, "comb", "-r", "/repo", "export", "p", "--format", "q") == [
        "qcow2"
    ]
    assert _complete(bash, script, "comb", "completion", "") == ["bash", "zsh"]


def test_zsh_script_loads_and_completes(cli: CliRunner, tmp_path: Path) -> None:
    zsh = need_tool("zsh")
    res = cli("completion", "zsh")
    assert res.code == 0 and res.out.startswith("#compdef comb\n")
    path = tmp_path / "_comb"
    path.write_text(res.out)

    def complete(*words: str) -> list[str]:
        # zsh's completion system filters the candidates by the typed prefix; here the
        # function is called directly, as bashcompinit's wrapper calls it (ksharrays on).
        quoted = " ".join("'" + w + "'" for w in words)
        program = (
            f"source '{path}'\nsetopt ksharrays\n"
            f"COMP_WORDS=({quoted}); COMP_CWORD={len(words) - 1}\n"
            '_comb; print -rl -- "${COMPREPLY[@]}"\n'
        )
        done = subprocess.run(
            [zsh, "-f", "-c", program], capture_output=True, text=True, check=True, timeout=60
        )
        assert done.stderr == ""
        return [w for w in done.stdout.splitlines() if w.startswith(words[-1])]

    assert complete("comb", "resto") == ["restore"]
    assert complete("comb", "restore", "p", "--overwrite", "") == ["never", "if-newer", "always"]
    assert "--recursive" in complete("comb", "ls", "--")


def test_unknown_shell_is_a_usage_error(cli: CliRunner) -> None:
    assert_one_line_error(cli("completion", "fish"), "fish", code=UsageError.exit_code)
