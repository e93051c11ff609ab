"""Peers on the same image in the same run: restic and borg, driven as subprocesses.

Owns: installing them only on request (apt-get, as root, with a clear message), one repository
each under the bench work directory, measured full/incremental backups and restores.
borg: ``borg init -e none``, ``borg create --chunker-params fixed,4194304 -C zstd,3`` (as the
issue specifies). restic: defaults (cache on, compression auto), RESTIC_PASSWORD set.
Must not: judge targets (backup.py does).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from .runs import files_identical, repo_bytes
from .sampler import TreeSampler, Usage

PEER_PACKAGES = {"restic": "restic", "borg": "borgbackup"}
PEER_ZSTD_LEVEL = 3  # borg's -C zstd,N


@dataclass
class PeerRun:
    tool: str
    step: str
    image_bytes: int
    wall_s: float
    usage: Usage = field(default_factory=Usage)
    repo_growth: int = 0
    identical: bool | None = None

    @property
    def mbps(self) -> float:
        return self.image_bytes / self.wall_s / 1e6

    def to_json(self) -> dict[str, Any]:
        return {
            "tool": self.tool,
            "step": self.step,
            "wall_s": round(self.wall_s, 3),
            "mbps": round(self.mbps, 1),
            "repo_growth": self.repo_growth,
            "cpu_s": round(self.usage.cpu_s, 2),
            "cpu_s_per_gb": round(self.usage.cpu_s / (self.image_bytes / 1e9), 3),
            "peak_rss": self.usage.peak_rss,
            "foreign_cores": round(self.usage.foreign_cores, 2),
            "identical": self.identical,
        }


def ensure_tools(install: bool = True) -> list[str]:
    """The peers available; installs missing ones with apt-get only when running as root."""
    missing = [t for t in PEER_PACKAGES if shutil.which(t) is None]
    if missing and install and os.geteuid() == 0 and shutil.which("apt-get"):
        pkgs = [PEER_PACKAGES[t] for t in missing]
        print(f"bench: installing peers with apt-get: {' '.join(pkgs)}", file=sys.stderr)
        subprocess.run(["apt-get", "install", "-y", "-q", *pkgs], check=False)
    missing = [t for t in PEER_PACKAGES if shutil.which(t) is None]
    if missing:
        names = " ".join(PEER_PACKAGES[t] for t in missing)
        print(
            f"bench: {', '.join(missing)} not found; install with `apt-get install {names}` "
            "to compare against peers",
            file=sys.stderr,
        )
    return [t for t in PEER_PACKAGES if t not in missing]


def tool_version(tool: str) -> str:
    args = [tool, "version"] if tool == "restic" else [tool, "--version"]
    try:
        out = subprocess.run(args, capture_output=True, text=True, check=False).stdout
    except OSError:
        return "?"
    return out.strip().splitlines()[0] if out.strip() else "?"


class Peer:
    """A backup tool with one repository; subclasses give the command lines."""

    name = "peer"
    tool = "peer"  # the program (tool_version, ensure_tools)
    full_only = False  # only in the full-backup rounds (a second configuration of a tool)

    def __init__(self, workdir: str) -> None:
        self.workdir = os.path.abspath(workdir)
        self.repo = os.path.join(self.workdir, f"repo-{self.name}")
        self.env = dict(os.environ)
        self.archives = 0

    def _run(self, args: list[str], cwd: str | None = None) -> None:
        proc = subprocess.run(args, env=self.env, cwd=cwd, capture_output=True, text=True)
        ok = (0, 1) if self.tool == "borg" else (0,)  # borg: 1 is a warning
        if proc.returncode not in ok:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise RuntimeError(f"{' '.join(args[:3])} failed ({proc.returncode}): {tail}")

    def init_args(self) -> list[str]:
        raise NotImplementedError

    def backup_args(self, image: str) -> list[str]:
        raise NotImplementedError

    def restore_args(self, target_dir: str) -> list[str]:
        raise NotImplementedError

    def init(self) -> None:
        if os.path.exists(self.repo):
            shutil.rmtree(self.repo)
        self._run(self.init_args())

    def backup(self, image: str, step: str) -> PeerRun:
        before = repo_bytes(self.repo)
        args = self.backup_args(image)
        with TreeSampler() as s:
            t0 = time.perf_counter()
            self._run(args)
            wall = time.perf_counter() - t0
        self.archives += 1
        grown = repo_bytes(self.repo) - before
        return PeerRun(self.name, step, os.path.getsize(image), wall, s.usage, grown)

    def restore(self, image: str, step: str = "restore", check: bool = True) -> PeerRun:
        """Restore the latest archive; fsync the output inside the timing (comb does too)."""
        target = os.path.join(self.workdir, f"restore-{self.name}")
        if os.path.exists(target):
            shutil.rmtree(target)
        os.makedirs(target)
        out = os.path.join(target, os.path.abspath(image).lstrip("/"))
        with TreeSampler() as s:
            t0 = time.perf_counter()
            self._run(self.restore_args(target), cwd=target)
            fd = os.open(out, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
            wall = time.perf_counter() - t0
        same = files_identical(image, out) if check else None
        shutil.rmtree(target)
        return PeerRun(self.name, step, os.path.getsize(image), wall, s.usage, 0, same)

    def cleanup(self) -> None:
        for path in (self.repo, *self.scratch_dirs()):
            if os.path.exists(path):
                shutil.rmtree(path)

    def scratch_dirs(self) -> list[str]:
        """The tool's own cache or state directories under the work directory."""
        return []


class Restic(Peer):
    name = tool = "restic"

    def __init__(self, workdir: str) -> None:
        super().__init__(workdir)
        self.env["RESTIC_PASSWORD"] = "comb-bench"
        self.env["RESTIC_CACHE_DIR"] = os.path.join(self.workdir, "restic-cache")

    def scratch_dirs(self) -> list[str]:
        return [self.env["RESTIC_CACHE_DIR"]]

    def init_args(self) -> list[str]:
        return ["restic", "init", "--repo", self.repo]

    def backup_args(self, image: str) -> list[str]:
        return ["restic", "backup", "--repo", self.repo, "--host", "bench", image]

    def restore_args(self, target_dir: str) -> list[str]:
        return ["restic", "restore", "latest", "--repo", self.repo, "--target", target_dir]


class Borg(Peer):
    """borg, fixed 4 MiB chunks, no encryption: the fastest borg."""

    name = tool = "borg"
    encryption = "none"

    def __init__(self, workdir: str) -> None:
        super().__init__(workdir)
        self.env["BORG_BASE_DIR"] = os.path.join(self.workdir, f"{self.name}-base")
        self.env["BORG_PASSPHRASE"] = "comb-bench"
        self.env["BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK"] = "yes"
        self.env["BORG_RELOCATED_REPO_ACCESS_IS_OK"] = "yes"

    def scratch_dirs(self) -> list[str]:
        return [self.env["BORG_BASE_DIR"]]

    def init_args(self) -> list[str]:
        return ["borg", "init", "-e", self.encryption, self.repo]

    def backup_args(self, image: str) -> list[str]:
        return [
            "borg",
            "create",
            "--chunker-params",
            "fixed,4194304",
            "-C",
            f"zstd,{PEER_ZSTD_LEVEL}",
            f"{self.repo}::a{self.archives}",
            image,
        ]

    def restore_args(self, target_dir: str) -> list[str]:
        return ["borg", "extract", "--sparse", f"{self.repo}::a{self.archives - 1}"]


class BorgRepokey(Borg):
    """borg's default encryption (repokey-blake2: AES-256-CTR + keyed BLAKE2b ids), fixed 4 MiB
    chunks: the row to hold comb's default (encrypted) repository against; full backups only."""

    name = "borg-repokey"
    encryption = "repokey-blake2"
    full_only = True


def make_peers(names: list[str], workdir: str) -> list[Peer]:
    """The peers of the tools found: restic; borg unencrypted and encrypted."""
    classes: dict[str, list[type[Peer]]] = {"restic": [Restic], "borg": [Borg, BorgRepokey]}
    return [cls(workdir) for n in names for cls in classes[n]]
