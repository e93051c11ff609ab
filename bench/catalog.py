"""Analytics at scale: every named report and the dashboard on a long synthetic history.

``python -m bench catalog`` writes (once; reused while its spec is unchanged) a catalog of
1,000 recovery points of a 256 GiB disk at 64 KiB chunks with about 0.5 % of the disk changing
per point, mostly in hot regions (``bench.catalog_gen``: the catalog's own writers, no backups),
then times each report as a user runs it: a fresh ``comb report`` process per run, the median
of ``--repeat`` runs, both the time inside the command (open the catalog + the report) and the
whole command (interpreter start and imports included). Must not: judge targets (report.py does).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace

from catalog.analytics.reports import REPORTS
from catalog.repo import Repository
from catalog.store.cachedir import CACHE_ENV

from .catalog_gen import GIB, Spec, generate, scaled
from .image import parse_size
from .machine import DEFAULT_WORKDIR, describe, header_lines
from .report import Target, table
from .runs import BENCH_PASSWORD

REPORT_ARGS = {"retention": ["--keep-last", "24", "--keep-daily", "7", "--keep-weekly", "4"]}
# Run inside the child: the time of opening the catalog and running one report, in seconds.
_TIMED = """
import sys, time
t0 = time.perf_counter()
from catalog.analytics.catalog import Catalog
from catalog.store.cachedir import CACHE_ENV
from catalog.repo import Repository
from pipeline.cli.analytics_cmd import report_options as _options
from pipeline.cli import build_parser
from pipeline.cli.passwords import password_source
from catalog.analytics.reports import run_report
args = build_parser().parse_args(sys.argv[1:])
t1 = time.perf_counter()
r = Repository.open(args.repo, password=password_source(args.password_file))  # as the CLI
cat = Catalog.open(r.storage, r.points())
if args.command == "dashboard":
    from catalog.analytics.dashboard.render import render_dashboard
    from catalog.analytics.dashboard.data import dashboard_data
    html = render_dashboard(dashboard_data(cat, args.repo))
    open(args.output, "w").write(html)
else:
    run_report(cat, args.name, _options(args))
print(time.perf_counter() - t1)
"""


def catalog_bytes(location: str) -> int:
    total = 0
    for sub in ("index", "manifests", "points", "config.json"):
        path = os.path.join(location, sub)
        if os.path.isfile(path):
            total += os.path.getsize(path)
        for folder, _dirs, files in os.walk(path):
            total += sum(os.path.getsize(os.path.join(folder, f)) for f in files)
    return total


def ensure_catalog(workdir: str, spec: Spec, encryption: str = "none") -> Repository:
    suffix = "" if encryption == "none" else "-encrypted"
    location = os.path.join(workdir, f"catalog-repo{suffix}")
    stamp = os.path.join(workdir, f"catalog-spec{suffix}.json")
    want = json.dumps(asdict(spec), sort_keys=True)
    if os.path.exists(stamp) and open(stamp).read() == want:
        return Repository.open(location, password=BENCH_PASSWORD)
    if os.path.exists(stamp):
        os.unlink(stamp)  # first: an interrupted rewrite must never pass for a finished one
    if os.path.exists(location):
        import shutil

        shutil.rmtree(location)
    os.makedirs(workdir, exist_ok=True)
    repo = Repository.init(
        location, spec.chunk_bytes, 3, encryption=encryption, password=BENCH_PASSWORD
    )
    t0 = time.perf_counter()
    print(f"writing a synthetic catalog: {spec.points} points of {spec.disk_bytes / GIB:.0f} GiB")
    generate(repo, spec, progress=True)
    print(f"  written in {time.perf_counter() - t0:.0f} s")
    with open(stamp, "w") as fh:
        fh.write(want)
    return repo


def _run(argv: list[str], cold: bool = False) -> tuple[float, float]:
    """(seconds inside the command, seconds of the whole process). ``cold``: with an empty
    lives cache, as the first such report on a machine."""
    t0 = time.perf_counter()
    env = {**os.environ, "COMB_PASSWORD": BENCH_PASSWORD}
    if cold:
        env[CACHE_ENV] = tempfile.mkdtemp(prefix="comb-bench-cache-")
    out = subprocess.run(
        [sys.executable, "-c", _TIMED, *argv], capture_output=True, text=True, check=False, env=env
    )
    wall = time.perf_counter() - t0
    if cold:
        shutil.rmtree(env[CACHE_ENV], ignore_errors=True)
    if out.returncode != 0:
        raise SystemExit(f"bench: {' '.join(argv)} failed: {out.stderr.strip().splitlines()[-1]}")
    return float(out.stdout.strip().splitlines()[-1]), wall


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench catalog", description=__doc__)
    ap.add_argument("--points", type=int, default=None, help="recovery points (default 1000)")
    ap.add_argument("--disk", default=None, help="disk size (default 256G)")
    ap.add_argument(
        "--run-chunks", type=float, default=None, help="mean write length in chunks (default 4)"
    )
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir", default=DEFAULT_WORKDIR)
    ap.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    ap.add_argument(
        "--encryption",
        choices=["none", "aes-256-gcm"],
        default="none",
        help="the catalog's encryption (default none; a second catalog is kept for each)",
    )
    args = ap.parse_args(argv)
    spec = scaled(Spec(), args.points, parse_size(args.disk) if args.disk else None)
    if args.run_chunks is not None:
        spec = replace(spec, run_chunks=args.run_chunks)
    repo = ensure_catalog(args.workdir, spec, args.encryption)
    points = repo.points()
    stored = sum(p.stats.bytes_stored for p in points)
    meta = catalog_bytes(repo.location)
    rows, figures = [], {}
    for name in REPORTS:
        argv_ = ["-r", repo.location, "report", name, *REPORT_ARGS.get(name, [])]
        runs = [_run(argv_) for _ in range(args.repeat)]
        inside = statistics.median(r[0] for r in runs)
        whole = statistics.median(r[1] for r in runs)
        figures[name] = {"inside_s": inside, "command_s": whole}
        rows.append([name, f"{inside:.2f}", f"{whole:.2f}"])
    # The first report needing chunk lives on a machine builds the local cache from every row.
    argv_ = ["-r", repo.location, "report", "unique"]
    runs = [_run(argv_, cold=True) for _ in range(args.repeat)]
    cold = statistics.median(r[0] for r in runs)
    figures["unique_no_cache"] = {
        "inside_s": cold,
        "command_s": statistics.median(r[1] for r in runs),
    }
    rows.append(
        [
            "unique, no lives cache yet",
            f"{cold:.2f}",
            f"{figures['unique_no_cache']['command_s']:.2f}",
        ]
    )
    page = os.path.join(args.workdir, "dashboard.html")
    runs = [_run(["-r", repo.location, "dashboard", page]) for _ in range(args.repeat)]
    dash = statistics.median(r[0] for r in runs)
    rows.append(["dashboard", f"{dash:.2f}", f"{statistics.median(r[1] for r in runs):.2f}"])
    print("\n".join(header_lines(describe())))
    print(
        f"catalog ({args.encryption}): {len(points)} points, {spec.disk_bytes / GIB:.0f} GiB disk, "
        f"{stored / GIB:.1f} GiB stored, catalog {meta / GIB:.2f} GiB"
    )
    print(
        table(
            f"seconds (median of {args.repeat} fresh processes)",
            ["report", "inside", "whole command"],
            rows,
        )
    )
    targets = [Target(f"report {n}", figures[n]["inside_s"], "<=", 1.0, "s") for n in REPORTS]
    targets.append(Target("dashboard", dash, "<=", 5.0, "s"))
    targets.append(Target("catalog size / stored data", 100 * meta / stored, "<=", 1.0, "%"))
    print(
        table(
            "targets (issue 5)",
            ["target", "value", "limit", "status", "note"],
            [t.row() for t in targets],
        )
    )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {
                    "spec": asdict(spec),
                    "reports": figures,
                    "dashboard_s": dash,
                    "catalog_bytes": meta,
                    "stored_bytes": stored,
                },
                fh,
                indent=2,
            )
    return 0
