"""Measuring one run: wall time, CPU of the whole process tree, peak memory, foreign load.

``TreeSampler`` samples this process and all its descendants (Ray's GCS, raylet, workers and
actors are descendants of a driver that started Ray; peer tools are subprocesses) every ~50 ms
in a thread: RSS and PSS (from /proc/PID/smaps_rollup) summed over the tree, and the CPU time
of every process seen (the last <50 ms of a process that exits between samples is lost).
Must not: start or stop anything it measures.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field

import psutil

SAMPLE_INTERVAL_S = 0.05
# smaps_rollup walks page tables and finding descendants scans all of /proc (together ~5 % of a
# core at 50 ms): both happen on every PSS_EVERY-th sample; RSS (statm) and CPU times of the
# processes already known on every sample. The sampler's own CPU is left out of ``cpu_s``.
PSS_EVERY = 4
MIB = 1024 * 1024


def load_average() -> tuple[float, float, float]:
    return os.getloadavg()


_RAY_GENERIC_NAMES = ("python", "ray::IDLE", "ray::CoreWorker")


def _name(p: psutil.Process) -> str:
    """A short process name; Ray workers by their title (ray::StageHost, ray::IDLE)."""
    try:
        cmd = p.cmdline()
        if cmd and cmd[0].startswith("ray::"):
            return cmd[0].split(".")[0].split()[0]
        return p.name()
    except psutil.Error:
        return str(p.pid)


def _rss(p: psutil.Process) -> int:
    try:
        return int(p.memory_info().rss)
    except psutil.Error:
        return 0


def _mem(pid: int) -> tuple[int, int]:
    """(rss, pss) in bytes; pss falls back to rss when smaps_rollup is unreadable."""
    rss = pss = -1
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as fh:
            for line in fh:
                if line.startswith(b"Rss:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith(b"Pss:"):
                    pss = int(line.split()[1]) * 1024
                    break
    except OSError:
        return 0, 0
    if pss < 0:
        pss = rss
    return max(rss, 0), max(pss, 0)


@dataclass
class Usage:
    """What one measured run used."""

    wall_s: float = 0.0
    cpu_s: float = 0.0  # user + system of the process tree
    peak_rss: int = 0
    peak_pss: int = 0
    start_pss: int = 0  # tree PSS when the run started
    foreign_cores: float = 0.0  # other processes' CPU during the run, in cores
    load_avg: float = 0.0  # 1-minute load average at the end
    processes: int = 0  # distinct processes seen
    sampler_cpu_s: float = 0.0  # the sampler thread's own CPU (left out of cpu_s)
    per_process_cpu_s: dict[str, float] = field(default_factory=dict)

    def cores(self) -> float:
        return self.cpu_s / self.wall_s if self.wall_s else 0.0


class TreeSampler:
    """Use as a context manager around the work to measure."""

    def __init__(self, interval_s: float = SAMPLE_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self.usage = Usage()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._me = psutil.Process()
        self._procs: dict[tuple[int, float], psutil.Process] = {}
        self._cpu_first: dict[tuple[int, float], float] = {}
        self._cpu_last: dict[tuple[int, float], float] = {}
        self._names: dict[tuple[int, float], str] = {}
        self._existing: set[tuple[int, float]] = set()
        self._alive: list[tuple[int, float]] = []
        self._t0 = 0.0
        self._sys0 = 0.0

    def __enter__(self) -> TreeSampler:
        self._sys0 = self._busy()
        for key in self._scan():
            self._existing.add(key)
        self.usage.start_pss = self._sample()
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.perf_counter() - self._t0
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        u = self.usage
        u.wall_s = wall
        per: dict[str, float] = {}
        total = 0.0
        for key, last in self._cpu_last.items():
            base = self._cpu_first[key] if key in self._existing else 0.0
            used = max(0.0, last - base)
            total += used
            name = self._names.get(key, "?")
            per[name] = per.get(name, 0.0) + used
        u.cpu_s = max(0.0, total - u.sampler_cpu_s)
        u.per_process_cpu_s = {k: round(v, 2) for k, v in sorted(per.items(), key=lambda x: -x[1])}
        u.processes = len(self._cpu_last)
        busy = self._busy() - self._sys0
        u.foreign_cores = max(0.0, (busy - total) / wall) if wall else 0.0
        u.load_avg = load_average()[0]

    @staticmethod
    def _busy() -> float:
        t = psutil.cpu_times()
        return float(t.user + t.nice + t.system + t.irq + t.softirq + getattr(t, "steal", 0.0))

    def _scan(self) -> list[tuple[int, float]]:
        try:
            procs = [self._me, *self._me.children(recursive=True)]
        except psutil.Error:
            procs = [self._me]
        keys = []
        for p in procs:
            try:
                key = (p.pid, p.create_time())
            except psutil.Error:
                continue
            if key not in self._procs:
                self._procs[key] = p
                self._names[key] = "bench (this process)" if p is self._me else _name(p)
            elif self._names[key] in _RAY_GENERIC_NAMES:
                self._names[key] = _name(p)  # a Ray worker takes its actor's name later
            keys.append(key)
        return keys

    def _sample(self, with_pss: bool = True, rescan: bool = True) -> int:
        pss_sum = rss_sum = 0
        keys = self._scan() if rescan else list(self._alive)
        self._alive = []
        for key in keys:
            p = self._procs[key]
            try:
                t = p.cpu_times()
            except psutil.Error:
                continue
            self._alive.append(key)
            cpu = float(t.user + t.system)
            self._cpu_first.setdefault(key, cpu)
            self._cpu_last[key] = cpu
            if with_pss:
                rss, pss = _mem(p.pid)
                pss_sum += pss
            else:
                rss = _rss(p)
            rss_sum += rss
        u = self.usage
        u.peak_rss = max(u.peak_rss, rss_sum)
        if with_pss:
            u.peak_pss = max(u.peak_pss, pss_sum)
        return pss_sum

    def _run(self) -> None:
        n = 0
        while not self._stop.wait(self.interval_s):
            n += 1
            self._sample(with_pss=n % PSS_EVERY == 0, rescan=n % PSS_EVERY == 0)
        self.usage.sampler_cpu_s = time.thread_time()


def tree_pss() -> int:
    """PSS of this process and its descendants, now."""
    me = psutil.Process()
    total = 0
    for p in [me, *me.children(recursive=True)]:
        total += _mem(p.pid)[1]
    return total
