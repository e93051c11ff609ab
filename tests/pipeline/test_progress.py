"""On a terminal, the long commands show a progress bar in the unit they count: a backup its
bytes (binary units, as every size comb prints), rate and ETA, saying what is starting until
the first report (``starting Ray ...``, not ``0/?``); verify and scrub count packs and say so."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from combtest import need_tool
from rich.console import Console

from pipeline.cli import progress

ROOT = Path(__file__).resolve().parents[2]


def _on_a_terminal(cmd: str, log: Path) -> str:
    """What ``cmd`` showed on a pseudo-terminal (util-linux ``script``), escapes removed."""
    script = need_tool("script")
    subprocess.run(
        [script, "-qec", cmd, str(log)], check=True, cwd=ROOT, capture_output=True, timeout=120
    )
    screen = log.read_bytes().decode("utf-8", "replace")
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen)


def test_backup_and_verify_on_a_terminal_show_progress(tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    with open(img, "wb") as fh:
        fh.write(os.urandom(96 << 20))
    repo = tmp_path / "repo"
    comb = f"{sys.executable} -m pipeline.cli -r {repo}"
    subprocess.run(f"{comb} init".split(), check=True, cwd=ROOT, capture_output=True)
    cmd = f"{comb} backup {img} --engine local --batch-mib 1 --workers 1"
    plain = _on_a_terminal(cmd, tmp_path / "backup.log")
    assert "backup disk.img: preparing ..." in plain
    assert re.search(r"\d+\.\d MiB/96\.0 MiB", plain), "bytes done / total, binary units"
    assert re.search(r"\d+\.\d [KMG]iB/s", plain), "rate"
    assert not re.search(r"\d [kMG]B\b", plain), "no decimal units"
    assert re.search(r"\d:\d\d:\d\d", plain), "ETA"
    assert re.search(r"recovery point \w+ .* \(\d+\.\d [KMG]iB/s read", plain)
    plain = _on_a_terminal(f"{comb} verify --read-data", tmp_path / "verify.log")
    assert re.search(r"verify .*\d+/\d+ packs", plain), "verify counts packs and says so"
    assert not re.search(r"\d+(\.\d+)?/\d+(\.\d+)? ([KMG]i)?B\b", plain), "not bytes"


@pytest.fixture
def screen(monkeypatch: pytest.MonkeyPatch) -> io.StringIO:
    """The bar drawn on a terminal of our own."""
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120, color_system=None)
    monkeypatch.setattr(progress, "_console", lambda: console)
    return out


def _plain(out: io.StringIO) -> str:
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.getvalue())


def test_the_bar_says_what_is_starting_until_the_first_report(screen: io.StringIO) -> None:
    with progress.progress_bar("backup disk.img", False, starting="starting Ray ...") as bar:
        assert bar is not None
        time.sleep(0.3)  # the engine starting: the bar redraws meanwhile
        starting = _plain(screen)
        assert "backup disk.img: starting Ray ..." in starting
        assert "/?" not in starting and "0.0 B" not in starting
        bar(3 << 20, 12 << 20)
        counting = _plain(screen)[len(starting) :]
    assert "starting Ray" not in counting and "3.0 MiB/12.0 MiB" in counting


def test_packs_are_counted_as_packs(screen: io.StringIO) -> None:
    with progress.progress_bar("scrub", False, progress.PACKS) as bar:
        assert bar is not None
        bar(3, 40)
    assert "3/40 packs" in _plain(screen)


def test_units() -> None:
    assert progress.counted(progress.BYTES, 1536, 3 << 30) == "1.5 KiB/3.0 GiB"
    assert progress.counted(progress.PACKS, 3, 40) == "3/40 packs"
    assert progress.counted(progress.BYTES, 0, None) == ""
    assert progress.rate(progress.BYTES, 100 << 20) == "100.0 MiB/s"
    assert progress.rate(progress.PACKS, 2.5) == "2.5 packs/s"


def test_nothing_is_drawn_off_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    with progress.progress_bar("restore", False) as bar:
        assert bar is None
    assert capsys.readouterr() == ("", "")
