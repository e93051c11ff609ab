"""``python -m bench integrity``: scrub, repair and prune on a repository of 100 points (the
default configuration: encrypted, with parity).

The mixed image (default 1 GiB) is backed up once and then 99 times after a change each
(alternately 200 scattered 4 KiB writes and 1 % of 64 KiB blocks rewritten, with the exact change
list), on the local engine. Then, each timed in this process:

- ``scrub`` of every pack (MB/s of stored bytes; the baseline is ``verify --read-data`` in the
  same run, which decompresses and re-hashes every chunk);
- parity: its space overhead (parity/ against packs/), the encoder alone (MB/s of pack bytes),
  and a full backup of the image with and without parity (what parity costs a backup);
- ``scrub --repair`` after a 256 KiB range of the largest pack is overwritten: the rebuild from
  parity alone ("repair MB/s": pack bytes rebuilt, checked and rewritten per second) and the
  whole command (scan, rebuild, atomic replace);
- ``prune`` after ``forget --keep-last 50``, then after ``--keep-last 10``, then with nothing to
  remove (the cost of marking alone), each with the bytes it removed.

Before that, the cost of encryption: full backups of the same image into a plain and an
encrypted repository, alternated (``--encryption-runs`` pairs), MB/s and the ratio of medians,
and restores of each. Must not: judge targets.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from typing import Any

import zfec

from catalog.maint import prune as pruning
from catalog.maint.check import check_repository
from catalog.maint.heal import heal_pack
from catalog.maint.retention import KeepPolicy, kept_by_policy
from catalog.maint.scrub import scrub
from catalog.repo import Repository
from catalog.store.local import LocalStorage
from catalog.store.parity import ParityGeometry, ParityWriter
from catalog.store.points import point_name

from .image import (
    GIB,
    change_block_rewrites,
    change_scattered_writes,
    generate_image,
    mixed_path,
    mixed_spec,
    parse_size,
    sparse_copy,
    warm,
)
from .machine import DEFAULT_WORKDIR, describe, header_lines
from .report import table
from .runs import BENCH_PASSWORD, backup, fresh_repo, repo_bytes, restore


def _open(location: str) -> Repository:
    return Repository.open(location, password=BENCH_PASSWORD)


def _forget(repo: Repository, keep: int) -> int:
    points = repo.points()
    kept = kept_by_policy(points, KeepPolicy(last=keep))
    gone = [p for p in points if p.id not in kept]
    for p in gone:
        repo.storage.remove(point_name(p.id))
    return len(gone)


def _prune(repo: Repository, label: str, rows: list[list[str]], figures: dict[str, Any]) -> None:
    before = repo_bytes(repo.location)
    t0 = time.perf_counter()
    res = pruning.prune(_open(repo.location))
    wall = time.perf_counter() - t0
    freed = before - repo_bytes(repo.location)
    rows.append(
        [
            label,
            f"{wall:.2f}",
            f"{res.exclusive_s:.2f}",
            f"{freed / 1e6:.0f} MB",
            f"{len(res.repacked.retired)}",
            f"{res.repacked.bytes / 1e6:.0f} MB",
        ]
    )
    figures[label] = {
        "seconds": wall,
        "exclusive_s": res.exclusive_s,
        "freed": freed,
        "repacked_packs": len(res.repacked.retired),
        "copied": res.repacked.bytes,
    }


def _encryption_cost(workdir: str, image: str, runs: int) -> tuple[list[list[str]], dict[str, Any]]:
    """Full backups into a plain and an encrypted repository, alternated; then one restore
    from each. Medians, and the encrypted/plain ratio of backup MB/s."""
    if runs <= 0:
        return [], {}
    mbps: dict[str, list[float]] = {"none": [], "aes-256-gcm": []}
    secs: dict[str, list[float]] = {"none": [], "aes-256-gcm": []}
    repos: dict[str, Repository] = {}
    for _ in range(runs):
        for enc in mbps:
            repo = fresh_repo(os.path.join(workdir, f"enc-{enc}"), encryption=enc)
            run = backup(repo, image, "local", f"full {enc}")
            mbps[enc].append(run.mbps)
            secs[enc].append(run.wall_s)
            repos[enc] = repo
    rows = []
    figures: dict[str, Any] = {}
    for enc, label in (("none", "backup, plain"), ("aes-256-gcm", "backup, AES-256-GCM")):
        m = sorted(mbps[enc])[len(mbps[enc]) // 2]
        s = sorted(secs[enc])[len(secs[enc]) // 2]
        rows.append([label, f"{m:.0f}", f"{s:.2f}"])
        figures[enc] = {"backup_mbps": mbps[enc], "backup_s": secs[enc]}
    for enc, label in (("none", "restore, plain"), ("aes-256-gcm", "restore, AES-256-GCM")):
        repo = repos[enc]
        if enc != "none":
            repo = _open(repo.location)
        out = os.path.join(workdir, "enc-restore.img")
        got = restore(repo, repo.points()[-1].id, out, label, reference=image)
        os.unlink(out)
        rows.append([label, f"{got.mbps:.0f}", f"{got.wall_s:.2f}"])
        figures[enc]["restore_mbps"] = got.mbps
    plain = sorted(mbps["none"])[runs // 2]
    enc_m = sorted(mbps["aes-256-gcm"])[runs // 2]
    rows.append(["encrypted / plain backup MB/s", f"{enc_m / plain:.2f}", ""])
    figures["ratio"] = enc_m / plain
    return rows, figures


def _tree_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _s, fs in os.walk(path) for f in fs)


def _parity(repo: Repository, image: str, workdir: str, figures: dict[str, Any]) -> list[list[str]]:
    """Space overhead, encoder MB/s, and a full backup with and without parity."""
    packs = _tree_bytes(os.path.join(repo.location, "packs"))
    par = _tree_bytes(os.path.join(repo.location, "parity"))
    g = repo.config.parity or ParityGeometry()
    data = os.urandom(64 * 1024 * 1024)
    scratch = LocalStorage(os.path.join(workdir, "parity-scratch"))
    os.makedirs(os.path.join(scratch.root, "tmp"), exist_ok=True)
    t0 = time.perf_counter()
    w = ParityWriter(scratch, g)
    for i in range(0, len(data), 1 << 20):
        w.update(memoryview(data)[i : i + (1 << 20)])
    w.abort()
    enc = len(data) / (time.perf_counter() - t0) / 1e6
    shutil.rmtree(scratch.root)
    walls = {}
    for label, geometry in (("with", g), ("without", None)):
        path = os.path.join(workdir, f"integrity-full-{label}")
        if os.path.exists(path):
            shutil.rmtree(path)
        r = Repository.init(path, parity=geometry, encryption="none")
        t0 = time.perf_counter()
        backup(r, image, "local", "full", source_name="disk")
        walls[label] = time.perf_counter() - t0
        shutil.rmtree(path)
    size = os.path.getsize(image)
    figures["parity"] = {
        "geometry": [g.data_shards, g.parity_shards, g.shard_bytes],
        "pack_bytes": packs,
        "parity_bytes": par,
        "encode_mb_s": enc,
        "full_backup_s": walls,
    }
    return [
        [
            f"geometry (zfec {zfec.__version__})",
            f"{g.data_shards}+{g.parity_shards} x {g.shard_bytes // 1024} KiB",
        ],
        [
            "parity space overhead",
            f"{par / packs * 100:.1f} % ({par / 1e6:.0f} MB for {packs / 1e6:.0f} MB of packs)",
        ],
        ["parity encoder alone (1 thread)", f"{enc:.0f} MB/s"],
        [
            "full backup with parity (local engine)",
            f"{size / walls['with'] / 1e6:.0f} MB/s ({walls['with']:.2f} s)",
        ],
        [
            "full backup without parity",
            f"{size / walls['without'] / 1e6:.0f} MB/s ({walls['without']:.2f} s)",
        ],
    ]


def _repair(repo: Repository, figures: dict[str, Any]) -> list[list[str]]:
    """Overwrite 256 KiB of the largest pack; time the rebuild alone and scrub --repair."""
    storage = repo.storage
    names = [n for n in storage.list("packs") if n.endswith(".pack")]
    name = max(names, key=storage.size)
    pid = name.rsplit("/", 1)[-1][: -len(".pack")]
    path = os.path.join(repo.location, name)
    size = os.path.getsize(path)
    original = open(path, "rb").read()
    with open(path, "r+b") as fh:
        fh.seek(size // 3)
        fh.write(os.urandom(256 * 1024))
    t0 = time.perf_counter()
    healed = heal_pack(storage, pid, repo.config.parity)
    heal_s = time.perf_counter() - t0
    assert healed.action == "rebuilt from parity" and open(path, "rb").read() == original
    with open(path, "r+b") as fh:
        fh.seek(size // 2)
        fh.write(os.urandom(256 * 1024))
    t0 = time.perf_counter()
    fixed = scrub(repo, repair=True)
    repair_s = time.perf_counter() - t0
    figures["repair"] = {"pack_bytes": size, "rebuild_s": heal_s, "scrub_repair_s": repair_s}
    return [
        [
            f"repair MB/s: rebuild a {size / 1e6:.0f} MB pack from parity (256 KiB overwritten)",
            f"{size / heal_s / 1e6:.0f}",
            f"{heal_s:.2f}",
        ],
        [
            f"scrub --repair (scan all, {len(fixed.damaged)} damaged chunk(s) healed in place)",
            f"{fixed.bytes / repair_s / 1e6:.0f}",
            f"{repair_s:.2f}",
        ],
    ]


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench integrity", description=__doc__)
    ap.add_argument("--size", default="1G")
    ap.add_argument("--points", type=int, default=100)
    ap.add_argument("--workdir", default=DEFAULT_WORKDIR)
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("--encryption-runs", type=int, default=3, help="backup pairs (0: skip)")
    args = ap.parse_args(argv)
    size = parse_size(args.size)
    os.makedirs(args.workdir, exist_ok=True)
    source = mixed_path(args.workdir, size)
    generate_image(mixed_spec(size), source)
    image = os.path.join(args.workdir, "integrity.img")
    sparse_copy(source, image)
    warm(image)
    enc_rows, enc_figures = _encryption_cost(args.workdir, image, args.encryption_runs)
    # The default configuration: encrypted, with parity.
    repo = fresh_repo(os.path.join(args.workdir, "integrity-repo"), encryption="aes-256-gcm")
    t0 = time.perf_counter()
    backup(repo, image, "local", "full", source_name="disk")
    for i in range(1, args.points):
        if i % 2:
            ch = change_scattered_writes(image, count=200, seed=100 + i)
        else:
            ch = change_block_rewrites(image, fraction=0.01, seed=100 + i)
        backup(
            _open(repo.location),
            image,
            "local",
            ch.name,
            changed_extents=ch.extents_path,
            source_name="disk",
        )
    build_s = time.perf_counter() - t0
    repo = _open(repo.location)
    stored = repo_bytes(repo.location)
    figures: dict[str, Any] = {"size": size, "points": args.points, "stored": stored}

    t0 = time.perf_counter()
    rep = scrub(repo)
    scrub_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    check_repository(repo.storage, read_data=True)
    verify_s = time.perf_counter() - t0
    rows = [
        [
            "scrub (whole-pack BLAKE3, 4 threads)",
            f"{rep.bytes / scrub_s / 1e6:.0f}",
            f"{scrub_s:.2f}",
        ],
        [
            "verify --read-data (baseline: every chunk decoded)",
            f"{rep.bytes / verify_s / 1e6:.0f}",
            f"{verify_s:.2f}",
        ],
    ]
    figures["scrub"] = {"bytes": rep.bytes, "seconds": scrub_s, "verify_seconds": verify_s}

    par_rows = _parity(repo, image, args.workdir, figures)
    rows += _repair(repo, figures)

    prune_rows: list[list[str]] = []
    _forget(repo, 50)
    _prune(repo, "prune after forget --keep-last 50", prune_rows, figures)
    _forget(_open(repo.location), 10)
    _prune(repo, "prune after forget --keep-last 10", prune_rows, figures)
    _prune(repo, "prune with nothing to remove", prune_rows, figures)

    print("\n".join(header_lines(describe())))
    print(
        f"repository: {args.points} points of a {size / GIB:.1f} GiB mixed image, "
        f"{stored / 1e9:.2f} GB stored, built in {build_s:.0f} s"
    )
    if enc_rows:
        print(table("encryption cost (full backup, local engine)", ["what", "MB/s", "s"], enc_rows))
        figures["encryption"] = enc_figures
    print(table("checking stored data", ["what", "MB/s", "s"], rows))
    print(table("parity", ["what", "figure"], par_rows))
    print(
        table(
            "prune",
            ["what", "s", "exclusive s", "freed", "packs repacked", "copied"],
            prune_rows,
        )
    )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(figures, fh, indent=2)
    return 0
