"""On a terminal, a backup shows a progress bar with bytes done, rate and ETA."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from combtest import need_tool

ROOT = Path(__file__).resolve().parents[2]


def test_backup_on_a_terminal_shows_progress(tmp_path: Path) -> None:
    script = need_tool("script")  # util-linux: runs the command on a pseudo-terminal
    img = tmp_path / "disk.img"
    with open(img, "wb") as fh:
        fh.write(os.urandom(96 << 20))
    repo = tmp_path / "repo"
    comb = f"{sys.executable} -m pipeline.cli -r {repo}"
    subprocess.run(f"{comb} init".split(), check=True, cwd=ROOT, capture_output=True)
    log = tmp_path / "typescript"
    cmd = f"{comb} backup {img} --engine local --batch-mib 1 --workers 1"
    subprocess.run(
        [script, "-qec", cmd, str(log)], check=True, cwd=ROOT, capture_output=True, timeout=120
    )
    screen = log.read_bytes().decode("utf-8", "replace")
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen)
    assert "backup disk.img" in plain
    assert re.search(r"\d+(\.\d+)?/\d+(\.\d+)? MB", plain), "bytes done / total"
    assert re.search(r"\d+(\.\d+)? [MG]B/s", plain), "rate"
    assert re.search(r"\d:\d\d:\d\d", plain), "ETA"
    assert "recovery point" in plain
