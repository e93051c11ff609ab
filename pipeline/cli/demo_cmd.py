"""``comb demo``: back up a sample disk through the pipeline, change it, back up incrementally,
restore, verify and query: the quickstart's first command, on an embedded default. Runs the
other commands through ``main``, as a user would type them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

import blake3
import numpy as np

from catalog.repo import Repository
from catalog.store.points import RecoveryPoint

from . import Subparsers, command, main


def add_parser(sub: Subparsers) -> None:
    s = command(
        sub,
        "demo",
        "back up, change, back up, restore, verify and query a sample disk (no -r needed)",
        ["comb demo", "comb demo --engine local --size-mib 64 --workdir /tmp/comb-demo"],
        json=None,
    )
    s.add_argument("--workdir", default="demo-work", help="where the demo puts its files")
    s.add_argument("--engine", choices=["ray", "local"], default="ray", help="the backups' engine")
    s.add_argument("--size-mib", type=int, default=512, help="the sample disk's size in MiB")
    s.set_defaults(run=cmd_demo, needs_repo=False)


def cmd_demo(repo: str, args: argparse.Namespace) -> int:
    return run_demo(args.workdir, args.engine, args.size_mib)


_WORDS = [f"{w}" for w in "alpha bravo charlie delta echo foxtrot golf hotel india juliet".split()]


def make_sample_image(path: str, size_mib: int, seed: int = 1) -> None:
    """A sparse image: holes, written zeros, compressible text and random data (64 KiB aligned)."""
    rng = np.random.default_rng(seed)
    mib = 1024 * 1024
    with open(path, "wb") as fh:
        fh.truncate(size_mib * mib)
        pos = 0
        while pos < size_mib * mib:
            length = int(rng.integers(1, 16)) * mib // 4
            length = min(length, size_mib * mib - pos)
            kind = rng.choice(4, p=[0.3, 0.1, 0.35, 0.25])
            if kind == 1:
                fh.seek(pos)
                fh.write(bytes(length))
            elif kind == 2:
                words = rng.choice(len(_WORDS), size=length // 6)
                text = " ".join(_WORDS[i] for i in words.tolist()).encode()
                fh.seek(pos)
                fh.write((text * 2)[:length])
            elif kind == 3:
                fh.seek(pos)
                fh.write(rng.bytes(length))
            pos += length


def scatter_writes(path: str, count: int, seed: int = 2) -> list[dict[str, int]]:
    """Overwrite ``count`` random 4 KiB blocks; returns the changed extents (as CBT would)."""
    rng = np.random.default_rng(seed)
    size = os.path.getsize(path)
    extents = []
    with open(path, "r+b") as fh:
        for off in sorted(set((rng.integers(0, size // 4096, count) * 4096).tolist())):
            fh.seek(off)
            fh.write(rng.bytes(4096))
            extents.append({"offset": int(off), "length": 4096})
    return extents


def _digest(path: str) -> str:
    h = blake3.blake3()
    with open(path, "rb") as fh:
        while block := fh.read(16 << 20):
            h.update(block)
    return h.hexdigest()


# The demo repository is encrypted (the default); its password is in a file of the workdir.
DEMO_PASSWORD = "comb demo password"
_password_file: list[str] = []


def _run(*args: str) -> None:
    args = (*_password_file, *args)
    print(f"\n$ comb {' '.join(args)}", flush=True)
    code = main(list(args))
    sys.stdout.flush()
    if code != 0:
        raise SystemExit(code)


def run_demo(workdir: str, engine: str, size_mib: int) -> int:
    work = os.path.abspath(workdir)
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    repo, img = os.path.join(work, "repo"), os.path.join(work, "disk.img")
    print(f"comb demo in {work}: a {size_mib} MiB sample disk, the {engine} engine")
    make_sample_image(img, size_mib)
    digests = [_digest(img)]
    pw = os.path.join(work, "password")
    with open(os.open(pw, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as fh:
        fh.write(DEMO_PASSWORD + "\n")
    _password_file[:] = ["--password-file", pw]
    print(f"# the repository is encrypted (AES-256-GCM) with the password in {pw}")
    _run("-r", repo, "init")
    _run("-r", repo, "backup", img, "--source-name", "demo-disk", "--engine", engine)

    print("\n# the guest writes 1,000 scattered 4 KiB blocks; change tracking reports them")
    changes = os.path.join(work, "changes.json")
    with open(changes, "w") as fh:
        json.dump(scatter_writes(img, 1000), fh)
    digests.append(_digest(img))
    _run(
        "-r",
        repo,
        "backup",
        img,
        "--source-name",
        "demo-disk",
        "--engine",
        engine,
        "--changed-extents",
        changes,
    )

    print("\n# more writes, this time backed up without a change list (reads all, stores new)")
    scatter_writes(img, 200, seed=3)
    digests.append(_digest(img))
    _run("-r", repo, "backup", img, "--source-name", "demo-disk", "--engine", engine)
    _run("-r", repo, "points")

    print("\n# every recovery point is a full image: restore the first and the latest")
    first_out, last_out = os.path.join(work, "first.img"), os.path.join(work, "latest.img")
    ids = _point_ids(repo)
    _run("-r", repo, "restore", ids[0][:8], first_out)
    _run("-r", repo, "restore", "demo-disk@latest", last_out)
    ok = _digest(first_out) == digests[0] and _digest(last_out) == digests[-1]
    print(f"restored images identical to the originals: {'yes' if ok else 'NO'}")
    _run("-r", repo, "verify", "--read-data")
    _run(
        "-r",
        repo,
        "query",
        "SELECT substr(id, 1, 8) AS point, mode, round(bytes_read / 1048576, 1) AS read_mib, "
        "round(bytes_new / 1048576, 1) AS new_mib, round(bytes_stored / 1048576, 1) AS stored_mib, "
        "metadata_bytes FROM points ORDER BY time",
    )
    _run(
        "-r",
        repo,
        "query",
        "SELECT round(sum(raw_len) / 1048576, 1) AS unique_mib, "
        "round(sum(stored_len) / 1048576, 1) AS stored_mib, "
        "round(sum(raw_len) / sum(stored_len), 2) AS compression_ratio FROM chunks",
    )
    _run(
        "-r",
        repo,
        "query",
        "SELECT substr(point_id, 1, 8) AS point, count(*) AS data_chunks, "
        "count(*) FILTER (WHERE NOT shared_leaf) AS in_new_leaves FROM manifests GROUP BY 1",
    )
    _files_demo(work, repo, engine)
    print("\n# named reports over the history, and a dashboard page")
    _run("-r", repo, "report", "unique")
    _run("-r", repo, "report", "hot-regions", "--bucket", "16M", "--limit", "5")
    _run("-r", repo, "dashboard", os.path.join(work, "dashboard.html"))
    print("\ndemo finished" + ("" if ok else " WITH A MISMATCH"))
    return 0 if ok else 1


def _files_demo(work: str, repo: str, engine: str) -> None:
    """A real ext4 disk (mkfs.ext4 -d), backed up, changed (debugfs) and backed up again: its
    files browsed, found, compared and restored without mounting anything."""
    print("\n# the files inside a point: an ext4 disk made with mkfs.ext4, changed, backed up")
    tree = os.path.join(work, "files-tree")
    for folder in ("etc/nginx", "home/ann/docs", "var/log"):
        os.makedirs(os.path.join(tree, folder))
    for name, text in (
        ("etc/hostname", "web01\n"),
        ("etc/nginx/nginx.conf", "worker_processes 2;\n"),
        ("home/ann/notes.txt", "remember the milk\n"),
    ):
        with open(os.path.join(tree, name), "w") as fh:
            fh.write(text)
    for i in range(200):
        with open(os.path.join(tree, "home/ann/docs", f"report-{i:03d}.txt"), "w") as fh:
            fh.write(f"report {i}\n" * 50)
    img = os.path.join(work, "files.img")
    with open(img, "wb") as fh:
        fh.truncate(64 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", tree, img], check=True, capture_output=True)
    _run("-r", repo, "backup", img, "--source-name", "web01", "--engine", engine)
    new = os.path.join(work, "nginx.conf")
    with open(new, "w") as fh:
        fh.write("worker_processes 8;\nevents { worker_connections 1024; }\n")
    script = os.path.join(work, "changes.debugfs")
    with open(script, "w") as fh:
        fh.write(f"rm /etc/nginx/nginx.conf\nwrite {new} /etc/nginx/nginx.conf\n")
        fh.write("rm /home/ann/notes.txt\n")
    subprocess.run(["debugfs", "-w", "-f", script, img], check=True, capture_output=True)
    _run("-r", repo, "backup", img, "--source-name", "web01", "--engine", engine)
    _run("-r", repo, "ls", "web01@latest")
    _run("-r", repo, "ls", "web01@latest", "/disk/etc", "-l")
    _run("-r", repo, "cat", "web01@latest", "/disk/etc/nginx/nginx.conf")
    _run("-r", repo, "find", "nginx.conf")
    first = [p for p in _points(repo) if p.source == "web01"][0].id
    _run("-r", repo, "diff", first[:8], "web01@latest", "--files")
    _run("-r", repo, "restore", first[:8], "--path", "/disk/home/ann",
         "--target", os.path.join(work, "restored"))  # fmt: skip
    _run("-r", repo, "report", "file-churn")


def _points(repo: str) -> list[RecoveryPoint]:
    return sorted(
        Repository.open(repo, password=DEMO_PASSWORD).points(), key=lambda p: (p.time, p.id)
    )


def _point_ids(repo: str) -> list[str]:
    return [p.id for p in Repository.open(repo, password=DEMO_PASSWORD).points()]
