"""Files across a long history: ``find`` over many points' file catalogs, and what the catalog
adds to the backup of an OS disk.

``python -m bench files-history`` measures two things, median of ``--repeat`` rounds:

- ``find``: a history of ``--points`` real recovery points (default 1,000) of an ext4 image of
  ``--files`` small files (default 100,000), each point a local-engine backup of the image after
  debugfs rewrote ``--change`` files in one folder (default 100), its file catalog built as a
  backup builds it (``index_after_backup``). Two files are in every point: ``hot.conf``
  (rewritten every 10th point) and ``never.conf`` (never changed). The history is built once and
  cached in the work directory (an interrupted build goes on where it stopped); a rerun only
  measures ``comb find NAME`` (in this process through ``pipeline.cli.main``, and the ``comb``
  program as a subprocess: its wall time), with and without ``--source`` and ``--since``, from
  find's local cache (``catalog.analytics.file_history``, kept in ``WORKDIR/cache``) and with
  none (every catalog read), and the catalog bytes stored per point.
- the OS disk: an ext4 image made with ``mkfs.ext4 -d`` from this machine's ``/usr`` (cached),
  backed up into fresh repositories with the catalog off (``--no-files``) and on (the backup,
  then ``index_after_backup`` as ``comb backup`` does), then an incremental after 1 % of the
  regular files were rewritten (debugfs, on a copy), both ways. ``--no-os`` skips it.

Must not: judge targets (bench/README.md does).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import datetime
from typing import Any

from catalog.analytics import file_history
from catalog.analytics.file_versions import versions
from catalog.repo import Repository
from catalog.store import filecat
from pipeline.cli import main as comb_main

from .files import build_image, debugfs, rewrite
from .files_os import index_as_backup, os_figures
from .machine import DEFAULT_WORKDIR, describe, header_lines
from .report import table
from .runs import backup, fresh_repo

SOURCE = "history"
HOT, NEVER = "hot.conf", "never.conf"
HOT_EVERY = 10  # points between two rewrites of hot.conf


def _payload(workdir: str, step: int) -> str:
    """A file of a size that changes with the step (a rewrite is always a modification)."""
    path = os.path.join(workdir, "history-payload.txt")
    with open(path, "w") as f:
        f.write(f"step {step}\n" * (1 + step % 50))
    return path


def _step_names(step: int, files: int, change: int) -> list[str]:
    """The small files the step-th point's backup sees rewritten: ``change`` files of one
    folder, folder and files moving on with the step."""
    folders = max(1, files // 1000)
    folder = step % folders
    per = min(change, 1000, files)
    first = (step // folders * per) % max(1, min(1000, files - folder * 1000) - per + 1)
    return [
        f"/d{folder:04d}/f{i:07d}.txt"
        for i in range(folder * 1000 + first, folder * 1000 + first + per)
        if i < files
    ]


def build_history(workdir: str, points: int, files: int, change: int) -> dict[str, Any]:
    """The cached history (built or finished first): its repository, points, build times."""
    home = os.path.join(workdir, f"history-{points}-{files}-{change}")
    stamp = os.path.join(home, "history.json")
    if os.path.exists(stamp):
        with open(stamp) as f:
            done: dict[str, Any] = json.load(f)
        return done
    os.makedirs(home, exist_ok=True)
    repo_path = os.path.join(home, "repo")
    image = os.path.join(home, "source.ext4")
    progress = os.path.join(home, "build.jsonl")
    if not os.path.exists(os.path.join(repo_path, "config.json")):
        base = build_image(workdir, files, 0)
        subprocess.run(["cp", "--sparse=always", base, image + ".tmp"], check=True)
        payload = _payload(home, 0)
        debugfs(
            image + ".tmp",
            ["mkdir /hot", "mkdir /cold", f"write {payload} /hot/{HOT}"]
            + [f"write {payload} /cold/{NEVER}"],
            home,
        )
        os.replace(image + ".tmp", image)
        fresh_repo(repo_path)
        if os.path.exists(progress):
            os.unlink(progress)
    repo = Repository.open(repo_path)
    steps: list[dict[str, float]] = []
    if os.path.exists(progress):
        with open(progress) as f:
            steps = [json.loads(line) for line in f]
    failed = os.path.join(home, "failed.txt")  # points whose first catalog failed
    failures: list[str] = []
    if os.path.exists(failed):
        with open(failed) as f:
            failures = f.read().split()
    have = len(repo.points())
    if have != len(steps):  # interrupted between the backup and its line: the catalog next
        for p in repo.points():
            if p.id not in filecat.cataloged(repo.storage):
                failures.append(p.id)
                index_as_backup(repo, p.id)
        steps = steps[:have]
    t_build = time.perf_counter()
    for step in range(have, points):
        t0 = time.perf_counter()
        if step:
            payload = _payload(home, step)
            names = _step_names(step, files, change)
            if step % HOT_EVERY == 0:
                names.append(f"/hot/{HOT}")
            debugfs(image, rewrite(names, payload), home)
        change_s = time.perf_counter() - t0
        run = backup(repo, image, "local", f"history {step}", source_name=SOURCE)
        index_s = index_as_backup(repo, run.point_id, failures)
        with open(failed, "w") as f:
            f.write("".join(p + "\n" for p in failures))
        line = {"change_s": change_s, "backup_s": run.wall_s, "index_s": index_s}
        steps.append(line)
        with open(progress, "a") as f:
            f.write(json.dumps(line) + "\n")
        if step % 20 == 0 or step == points - 1:
            left = (time.perf_counter() - t_build) / (step - have + 1) * (points - step - 1)
            print(
                f"  point {step + 1}/{points}: backup {run.wall_s:.2f} s, catalog "
                f"{index_s:.2f} s, debugfs {change_s:.2f} s (about {left / 60:.0f} min left)",
                flush=True,
            )
    done = {
        "repo": repo_path,
        "points": points,
        "files": files,
        "change": change,
        "catalog_failures": failures,
        "steps": steps,
    }
    with open(stamp + ".tmp", "w") as f:
        json.dump(done, f)
    os.replace(stamp + ".tmp", stamp)
    os.unlink(image)  # the points hold it; the stamp says the history is complete
    return done


def catalog_stored(repo: Repository) -> dict[str, int]:
    """Bytes of the file catalogs: documents, full listings, change tables."""
    out = {"docs": 0, "full": 0, "changes": 0}
    fulls: set[str] = set()
    for pid in filecat.cataloged(repo.storage):
        doc = filecat.read_doc(repo.storage, pid)
        if doc is not None and doc.full:
            fulls.add(filecat.data_name(doc.full))
    for name in repo.storage.list(filecat.FILES_PREFIX):
        size = repo.storage.size(name)
        if name.endswith(".json"):
            out["docs"] += size
        elif name in fulls:
            out["full"] += size
        else:
            out["changes"] += size
    return out


def find_inproc(repo_path: str, argv: list[str]) -> tuple[float, int]:
    """``comb -r REPO find ... --json`` through the CLI's own entry point: (seconds, versions)."""
    out = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(out):
        code = comb_main(["-r", repo_path, "find", *argv, "--json"])
    seconds = time.perf_counter() - t0
    if code != 0:
        raise SystemExit(f"bench: comb find {' '.join(argv)} exited {code}")
    return seconds, len(json.loads(out.getvalue())["versions"])


def find_process(repo_path: str, argv: list[str]) -> float:
    """Wall time of the ``comb`` program running the same find (interpreter start included)."""
    comb = os.path.join(os.path.dirname(sys.executable), "comb")
    t0 = time.perf_counter()
    subprocess.run(
        [comb, "-r", repo_path, "find", *argv, "--json"], check=True, capture_output=True
    )
    return time.perf_counter() - t0


def find_phases(repo_path: str) -> dict[str, float]:
    """Where a warm find's time goes: opening the repository, the history (its cache checked
    against the repository's names), the matching and the versions."""
    t0 = time.perf_counter()
    r = Repository.open(repo_path)
    t1 = time.perf_counter()
    history = file_history.load(r.storage)
    t2 = time.perf_counter()
    versions(history, HOT)
    t3 = time.perf_counter()
    return {"open_s": t1 - t0, "history_s": t2 - t1, "versions_s": t3 - t2}


def cold_find(repo_path: str) -> tuple[float, int]:
    """A find with no cache: every catalog read from the repository, the cache written."""
    r = Repository.open(repo_path)
    path = file_history.cache_path(r.config.id)
    if os.path.exists(path):
        os.unlink(path)
    seconds, _ = find_inproc(repo_path, [HOT])
    return seconds, os.path.getsize(path)


def find_figures(done: dict[str, Any], repeat: int) -> dict[str, Any]:
    repo_path = done["repo"]
    repo = Repository.open(repo_path)
    points = sorted(repo.points(), key=lambda p: (p.time, p.id))
    since = datetime.fromisoformat(points[len(points) * 3 // 4].time).isoformat()
    cases = []
    for name in (HOT, NEVER):
        for label, extra in (
            ("", []),
            ("--source", ["--source", SOURCE]),
            ("--since (last quarter)", ["--since", since]),
            ("--source --since", ["--source", SOURCE, "--since", since]),
        ):
            cases.append((f"find {name} {label}".rstrip(), [name, *extra]))
    cold = [cold_find(repo_path) for _ in range(repeat)]  # (and warms imports, page cache)
    rows: dict[str, Any] = {}
    for label, argv in cases:
        runs = [find_inproc(repo_path, argv) for _ in range(repeat)]
        rows[label] = {
            "argv": argv,
            "inproc_s": statistics.median(s for s, _ in runs),
            "versions": runs[0][1],
        }
    for label, argv in cases[:1] + cases[4:5]:
        rows[label]["process_s"] = statistics.median(
            find_process(repo_path, argv) for _ in range(repeat)
        )
    phases = [find_phases(repo_path) for _ in range(repeat)]
    stored = catalog_stored(repo)
    return {
        "points": len(points),
        "since": since,
        "finds": rows,
        "cold_find_s": statistics.median(s for s, _ in cold),
        "cache_bytes": cold[0][1],
        "phases": {k: statistics.median(p[k] for p in phases) for k in phases[0]},
        "stored": stored,
        "stored_per_point": sum(stored.values()) / len(points),
    }


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench files-history", description=__doc__.split("\n")[0]
    )
    p.add_argument("--points", type=int, default=1000, help="points of the history (1000)")
    p.add_argument("--files", type=int, default=100_000, help="small files in the image")
    p.add_argument("--change", type=int, default=100, help="files rewritten per point (100)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--workdir", default=DEFAULT_WORKDIR)
    p.add_argument("--os-tree", default="/usr", help="the OS tree of the OS disk image (/usr)")
    p.add_argument("--no-find", action="store_true", help="skip the history and find")
    p.add_argument("--no-os", action="store_true", help="skip the OS disk backups")
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = p.parse_args(argv)
    os.makedirs(args.workdir, exist_ok=True)
    env = describe()
    print("\n".join(header_lines(env)), flush=True)
    figures: dict[str, Any] = {"env": env}
    if not args.no_find:
        os.environ["COMB_CACHE_DIR"] = os.path.join(os.path.abspath(args.workdir), "cache")
        t0 = time.perf_counter()
        done = build_history(args.workdir, args.points, args.files, args.change)
        built = time.perf_counter() - t0
        steps = done["steps"]
        per = {k: statistics.median(s[k] for s in steps[1:] or steps) for k in steps[0]}
        got = find_figures(done, args.repeat)
        figures["history"] = {"build_s_this_run": built, "per_point": per, **got}
        rows = [
            [
                label,
                f"{f['inproc_s']:.3f} s",
                f"{f['process_s']:.2f} s" if "process_s" in f else "-",
                f["versions"],
            ]  # fmt: skip
            for label, f in got["finds"].items()
        ]
        title = f"find over {got['points']} points of {args.files} files (median of rounds)"
        print(table(title, ["query", "in process", "comb program", "versions"], rows))
        st = got["stored"]
        rows = [
            ["find hot.conf with no cache (reads every catalog)", f"{got['cold_find_s']:.2f} s"],
            ["the cache it writes", f"{got['cache_bytes'] / 2**20:.1f} MiB"],
            ["warm find: repository open", f"{got['phases']['open_s']:.3f} s"],
            ["warm find: history from the cache", f"{got['phases']['history_s']:.3f} s"],
            ["warm find: match + versions", f"{got['phases']['versions_s']:.3f} s"],
            ["catalog bytes per point", f"{got['stored_per_point'] / 1024:.1f} KiB"],
            ["  of which full listings", f"{st['full'] / got['points'] / 1024:.1f} KiB"],
            ["  of which change tables", f"{st['changes'] / got['points'] / 1024:.1f} KiB"],
            ["  of which documents", f"{st['docs'] / got['points'] / 1024:.1f} KiB"],
            ["build: backup per point", f"{per['backup_s']:.2f} s"],
            ["build: catalog per point", f"{per['index_s']:.2f} s"],
            ["build: debugfs per point", f"{per['change_s']:.2f} s"],
        ]
        print(table("history", ["figure", "value"], rows))
    if not args.no_os:
        got = os_figures(args.workdir, args.os_tree, args.repeat)
        figures["os"] = got
        off, on = got["off"], got["on"]
        rows = []
        for kind in ("full", "incremental"):
            rows.append(
                [
                    kind,
                    f"{off[f'{kind}_s']:.1f} s",
                    f"{on[f'{kind}_backup_s']:.1f} + {on[f'{kind}_index_s']:.1f} s",
                    f"{(on[f'{kind}_s'] / off[f'{kind}_s'] - 1) * 100:+.1f} %",
                    f"{on[f'{kind}_index_s'] / on[f'{kind}_backup_s'] * 100:.1f} %",
                ]
            )
        title = (
            f"OS disk {args.os_tree}: {got['image_bytes'] / 2**30:.1f} GiB image, "
            f"{got['regular_files']} files, {got['changed_files']} rewritten (median of rounds)"
        )
        print(
            table(
                title,
                ["backup", "--no-files", "catalog on: backup + catalog", "slowdown", "cat/backup"],
                rows,
            )
        )  # fmt: skip
    print(json.dumps(figures, default=str))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, default=str, indent=1)
    return 0
