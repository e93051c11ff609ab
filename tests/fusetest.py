"""A real ``comb mount`` in a subprocess for the FUSE tests (importable as ``fusetest``):
``Mount`` starts it and waits until the kernel shows the mount; ``need_fuse`` skips locally
(fails in CI) where /dev/fuse or pyfuse3 is missing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def need_fuse() -> None:
    ci = os.environ.get("CI", "").lower() == "true"
    if not os.path.exists("/dev/fuse"):
        if ci:
            pytest.fail("/dev/fuse is required in CI")
        pytest.skip("/dev/fuse is missing")
    try:
        import pyfuse3  # noqa: F401
    except ImportError:
        if ci:
            pytest.fail("pyfuse3 is required in CI")
        pytest.skip("pyfuse3 is not installed")


class Mount:
    """``comb -r REPO mount MOUNTPOINT`` in the background."""

    def __init__(self, repo: str, mountpoint: Path) -> None:
        need_fuse()
        mountpoint.mkdir(exist_ok=True)
        self.path = mountpoint
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "-r", repo, "mount", str(mountpoint)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # printed once it listens for signals
        assert line.startswith("mounted ") and str(mountpoint) in line, self._fail_text(line)
        deadline = time.monotonic() + 20
        while not os.path.ismount(mountpoint):
            assert time.monotonic() < deadline and self.proc.poll() is None, self._fail_text(line)
            time.sleep(0.05)

    def _fail_text(self, line: str) -> str:
        return f"not mounted: {line!r} {self.proc.poll()}"

    def stop(self, signum: int = signal.SIGTERM) -> tuple[int, str, str]:
        self.proc.send_signal(signum)
        out, err = self.proc.communicate(timeout=20)
        return self.proc.returncode, out, err

    def cleanup(self) -> None:
        """After a failure only: no process and no dead mount left behind (``ismount`` is
        False on a dead FUSE mount, so the mount table is asked)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if in_mount_table(self.path):
            subprocess.run(["umount", "-l", str(self.path)], check=False)


def in_mount_table(path: Path) -> bool:
    with open("/proc/self/mountinfo") as fh:
        return any(line.split()[4] == str(path) for line in fh)
