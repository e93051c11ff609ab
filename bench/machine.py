"""Where and when figures were taken: machine, versions, commit, load."""

from __future__ import annotations

import os
import platform
import subprocess
from datetime import UTC, datetime
from importlib import metadata
from typing import Any

import psutil

from .sampler import load_average

# Scratch space for images and repositories (several GB): COMB_BENCH_DIR, else bench-work/
# in the current directory (ignored by git).
DEFAULT_WORKDIR = os.environ.get("COMB_BENCH_DIR", os.path.abspath("bench-work"))

LIBRARIES = ("ray", "pyarrow", "zstandard", "blake3", "numpy")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def _commit() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(
            ["git", "-C", here, "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
        )
        dirty = subprocess.run(
            ["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=False,
        )
    except OSError:
        return "?"
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def describe() -> dict[str, Any]:
    versions = {}
    for lib in LIBRARIES:
        try:
            versions[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            versions[lib] = "-"
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "commit": _commit(),
        "versions": versions,
        "load_avg_start": [round(x, 2) for x in load_average()],
    }


def header_lines(env: dict[str, Any]) -> list[str]:
    libs = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    la = " ".join(f"{x:.2f}" for x in env["load_avg_start"])
    lines = [
        f"comb bench  {env['date']}  commit {env['commit']}",
        f"machine: {env['cpu']}, {env['cores']} cores, {env['ram_gib']} GiB RAM, "
        f"Linux {env['kernel']}, Python {env['python']}",
        f"libraries: {libs}",
        f"load average at start: {la}",
    ]
    if env["load_avg_start"][0] > 0.5 * (env["cores"] or 1):
        lines.append("NOTE: the machine is loaded; figures are taken under foreign load.")
    return lines
