"""Driving comb through its Python API, one measured run at a time.

Owns: fresh repositories under the bench work directory, one measured backup or restore, and the
dedup-index figure. Everything goes through the public entry points (Repository,
run_backup, make_engine, restore_point); must not reach into stage internals.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from catalog.repo import Repository
from catalog.store.format import DEFAULT_CHUNK_SIZE_BYTES
from catalog.store.index import DedupIndex
from catalog.store.points import RecoveryPoint
from pipeline.engines import make_engine
from pipeline.jobs.backup import run_backup
from pipeline.jobs.restore import restore_point
from pipeline.jobs.runner import BackupOptions

from .sampler import TreeSampler, Usage


@dataclass
class BackupRun:
    """One comb backup: wall time around run_backup, the point's statistics, what it used."""

    label: str
    engine: str
    mode: str
    image_bytes: int
    wall_s: float
    startup_s: float
    stats: dict[str, Any]
    usage: Usage
    point_id: str = ""
    cpu_by_stage: dict[str, float] = field(default_factory=dict)  # the pipeline's own profile
    repo_growth: int = 0  # the repository directory's growth (packs, parity, metadata)

    @property
    def work_s(self) -> float:
        """run_backup's own seconds without the engine start-up (Ray: init + actors)."""
        return max(1e-9, float(self.stats["seconds"]) - self.startup_s)

    @property
    def mbps(self) -> float:
        """Logical MB/s (10^6 bytes of image per second of wall time, start-up included)."""
        return self.image_bytes / self.wall_s / 1e6

    @property
    def mbps_work(self) -> float:
        return self.image_bytes / self.work_s / 1e6

    @property
    def cpu_s_per_gb(self) -> float:
        return self.usage.cpu_s / (self.image_bytes / 1e9)

    def to_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "engine": self.engine,
            "mode": self.mode,
            "wall_s": round(self.wall_s, 3),
            "startup_s": round(self.startup_s, 3),
            "mbps": round(self.mbps, 1),
            "mbps_without_startup": round(self.mbps_work, 1),
            "cpu_s": round(self.usage.cpu_s, 2),
            "cpu_s_per_gb": round(self.cpu_s_per_gb, 3),
            "peak_rss": self.usage.peak_rss,
            "peak_pss": self.usage.peak_pss,
            "start_pss": self.usage.start_pss,
            "foreign_cores": round(self.usage.foreign_cores, 2),
            "load_avg": round(self.usage.load_avg, 2),
            "sampler_cpu_s": round(self.usage.sampler_cpu_s, 3),
            "stats": self.stats,
            "repo_growth": self.repo_growth,
            "cpu_by_stage": self.cpu_by_stage,
            "per_process_cpu_s": self.usage.per_process_cpu_s,
        }


@dataclass
class RestoreRun:
    label: str
    image_bytes: int
    wall_s: float
    data_bytes: int
    identical: bool | None
    usage: Usage = field(default_factory=Usage)

    @property
    def mbps(self) -> float:
        return self.image_bytes / self.wall_s / 1e6

    def to_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "wall_s": round(self.wall_s, 3),
            "mbps": round(self.mbps, 1),
            "data_bytes": self.data_bytes,
            "identical": self.identical,
            "cpu_s": round(self.usage.cpu_s, 2),
            "peak_pss": self.usage.peak_pss,
            "foreign_cores": round(self.usage.foreign_cores, 2),
        }


# The password of the benchmarks' encrypted repositories (never a real secret).
BENCH_PASSWORD = "comb bench password"


def fresh_repo(
    path: str,
    chunk_size: int | None = None,
    encryption: str = "none",
    zstd_level: int | None = None,
) -> Repository:
    """An empty repository at ``path`` (whatever was there is removed). Plain unless asked:
    the figures of every other benchmark stay comparable with earlier runs; ``python -m bench
    integrity`` measures what encryption costs."""
    if os.path.exists(path):
        shutil.rmtree(path)
    return Repository.init(
        path,
        chunk_size=chunk_size or DEFAULT_CHUNK_SIZE_BYTES,
        zstd_level=zstd_level,
        encryption=encryption,
        password=BENCH_PASSWORD if encryption != "none" else None,
    )


def backup(
    repo: Repository,
    image: str,
    engine: str,
    label: str,
    changed_extents: str | None = None,
    workers: int | None = None,
    source_name: str | None = None,
) -> BackupRun:
    """One measured comb backup (the sampler covers Ray's processes when Ray starts inside)."""
    # "local": the bench measures comb's own Ray, never one `ray start` left running here
    eng = make_engine(engine, ray_address="local" if engine == "ray" else None, workers=workers)
    opts = BackupOptions(changed_extents=changed_extents, source_name=source_name)
    size = os.path.getsize(image)
    before = repo_bytes(repo.location)
    with TreeSampler() as sampler:
        t0 = time.perf_counter()
        point: RecoveryPoint = run_backup(repo, image, eng, opts)
        wall = time.perf_counter() - t0
    return BackupRun(
        label=label,
        engine=engine,
        mode=point.mode,
        image_bytes=size,
        wall_s=wall,
        startup_s=float(eng.startup_s),
        stats=asdict(point.stats),
        usage=sampler.usage,
        point_id=point.id,
        cpu_by_stage=dict(eng.cpu_by_stage),
        repo_growth=repo_bytes(repo.location) - before,
    )


def restore(
    repo: Repository, point_id: str, out: str, label: str, reference: str | None = None
) -> RestoreRun:
    """One measured restore of a point into a sparse file (comb fsyncs it before returning)."""
    point = repo.resolve(point_id)
    if os.path.exists(out):
        os.unlink(out)
    with TreeSampler() as sampler:
        t0 = time.perf_counter()
        written = restore_point(repo, point, out)
        wall = time.perf_counter() - t0
    same = files_identical(reference, out) if reference is not None else None
    return RestoreRun(label, point.size, wall, written, same, sampler.usage)


def files_identical(a: str, b: str, block: int = 16 * 1024 * 1024) -> bool:
    """Byte comparison of two files (not timed)."""
    if os.path.getsize(a) != os.path.getsize(b):
        return False
    with open(a, "rb", buffering=0) as fa, open(b, "rb", buffering=0) as fb:
        while True:
            x = fa.read(block)
            y = fb.read(block)
            if x != y:
                return False
            if not x:
                return True


@dataclass(frozen=True)
class CommandRun:
    """``comb backup --engine local`` run as a user runs it: its own process."""

    wall_s: float
    peak_rss: int  # the process's peak resident set (bytes; an upper bound of its PSS)
    returncode: int
    # Its peak anonymous memory and peak file-backed resident pages (shared libraries' code,
    # sampled every 50 ms): the first is what it allocated; the second the kernel may drop.
    peak_anon: int = 0
    peak_file: int = 0


def command_backup(repo: Repository, image: str, password: str) -> CommandRun:
    """One local-engine backup through the command line, in a child process whose peak memory
    the kernel reports (``wait4``): the bench's own process carries what earlier runs left
    (Ray's driver, freed arenas), which a user's ``comb backup`` never has."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, COMB_PASSWORD=password)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    args = [sys.executable, "-m", "pipeline.cli", "backup", "-r", repo.location]
    args += ["--engine", "local", "--no-files", image]
    peaks = {"RssAnon:": 0, "RssFile:": 0}
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=err)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            _status_peaks(proc.pid, peaks)
            time.sleep(0.05)
        wall = time.perf_counter() - t0
        proc.returncode = rc = os.waitstatus_to_exitcode(status)
        if rc != 0:
            err.seek(0)
            print(f"bench: comb backup failed ({rc}): {err.read().decode(errors='replace')}")
    return CommandRun(wall, usage.ru_maxrss * 1024, rc, peaks["RssAnon:"], peaks["RssFile:"])


def _status_peaks(pid: int, peaks: dict[str, int]) -> None:
    """Raise ``peaks`` (``/proc/PID/status`` field -> bytes) to the process's values now."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                key = line.split(":", 1)[0] + ":"
                if key in peaks:
                    peaks[key] = max(peaks[key], int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass  # (it exited between two looks)


def index_per_chunk(repo: Repository) -> tuple[int, int]:
    """(resident bytes of the dedup index as a backup loads it, chunks in the repository)."""
    index = DedupIndex.load(repo.storage)
    return index.resident_bytes, len(index)


def repo_bytes(path: str) -> int:
    """Apparent size of everything under a directory."""
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total
