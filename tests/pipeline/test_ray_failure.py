"""A stage failing inside a Ray actor fails the job promptly, commits nothing, leaves no Ray."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from combtest import TEST_PASSWORD

ROOT = Path(__file__).resolve().parents[2]

# The source is cut short after planning, just before the workers start: the reader stage then
# hits the end of the file inside a Ray actor (a real failure, nothing mocked).
DRIVER = r"""
import json, os, sys
import psutil
from catalog.errors import CombError
from catalog.repo import Repository
from pipeline.jobs.backup import run_backup
from pipeline.jobs.runner import BackupOptions
from pipeline.engines import RayEngine

repo_path, image, password = sys.argv[1], sys.argv[2], sys.argv[3]
ray_pids = []

class CuttingEngine(RayEngine):
    def start(self, repo_path, make_stage, sealer):
        os.truncate(image, 3 << 20)
        super().start(repo_path, make_stage, sealer)
        for p in psutil.Process().children(recursive=True):
            ray_pids.append(p.pid)

try:
    opts = BackupOptions(batch_bytes=1 << 20)
    run_backup(Repository.open(repo_path, password=password), image, CuttingEngine(), opts)
    print(json.dumps({"error": None, "pids": ray_pids}))
except CombError as err:
    print(json.dumps({"error": err.message, "type": type(err).__name__, "pids": ray_pids}))
"""


@pytest.mark.ray
def test_stage_failure_in_an_actor(tmp_path: Path) -> None:
    from catalog.repo import Repository

    image = tmp_path / "disk.img"
    with open(image, "wb") as fh:
        fh.write(b"\x17" * (12 << 20))
    repo = Repository.init(str(tmp_path / "repo"), password=TEST_PASSWORD)
    run = subprocess.run(
        [sys.executable, "-c", DRIVER, repo.location, str(image), TEST_PASSWORD],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["type"] == "SourceReadError"  # (a StageError: exit 8; the source at fault)
    assert "stage reader failed on extent" in result["error"]
    assert str(image) in result["error"] and "\n" not in result["error"]
    assert repo.points() == []
    assert repo.storage.list("points") == []
    assert result["pids"], "the Ray processes were recorded"
    deadline = time.monotonic() + 30
    alive = [p for p in result["pids"] if psutil.pid_exists(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.5)
        alive = [p for p in alive if psutil.pid_exists(p) and _is_running(p)]
    assert not alive, f"Ray processes left behind: {alive}"


def _is_running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
