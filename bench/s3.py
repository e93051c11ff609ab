"""``python -m bench s3``: a repository on S3 against the same server's own ceiling and against a
repository in a local directory, in one run.

The server is ``localbucket`` (a file-backed S3 server in Python, its own process, its data
beside the local repository on the same disk), so the figures compare comb with what the same
client and server do without comb, never with real S3's latency. The ceiling: the same boto3
client configuration as comb's (``catalog.store.s3``) putting and getting 64 MiB objects with 1
and 4 requests in flight, and 64 KiB ranged GETs one at a time. Then, on S3 and on a local
directory: a full backup of the mixed image, an incremental after 1,000 scattered 4 KiB writes
(with the change list), a restore of the latest point, and the first 4 KiB read of it through
``comb serve`` from start (with and without the local copies kept); for S3 also the API calls
each made, by operation. Last, ``comb copy`` of the full point into S3 repositories that hold
the same data already (backed up there on their own), one with keys of its own and one made
with ``init --copy-keys-from`` (shared chunk ids: nothing to read). Must not: judge anything
but the targets it prints.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from unittest import mock

from catalog.repo import Repository
from catalog.store import s3_client
from catalog.store.crypto import ALGORITHM
from catalog.store.points import RecoveryPoint
from catalog.store.s3 import is_s3
from pipeline.engines import make_engine
from pipeline.jobs import restore as restore_job
from pipeline.jobs.copy import copy_points

from .drive_serve import first_read_seconds
from .image import (
    GIB,
    MIB,
    change_scattered_writes,
    generate_image,
    mixed_path,
    mixed_spec,
    parse_size,
    sparse_copy,
    warm,
)
from .machine import DEFAULT_WORKDIR, describe, header_lines
from .report import Target, table, targets_table
from .runs import BENCH_PASSWORD, backup, restore

OBJECT_BYTES = 64 * MIB  # the ceiling's objects: a pack's size
OBJECTS = 8
RANGE_READS = 300


def _server(data: str) -> tuple[subprocess.Popen[bytes], str]:
    beside = os.path.join(os.path.dirname(sys.executable), "localbucket")
    tool = beside if os.access(beside, os.X_OK) else shutil.which("localbucket")
    if tool is None:
        raise SystemExit("bench s3 needs localbucket (pip install localbucket)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    proc = subprocess.Popen(
        [tool, "--host", "127.0.0.1", "--port", str(port), data],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("bench s3: localbucket did not start") from None
            time.sleep(0.05)


def _ceiling(client: Any, bucket: str) -> dict[str, float]:
    """MB/s of whole-object PUTs and GETs at 1 and 4 in flight; ms of one 64 KiB range."""
    body = random.Random(5).randbytes(OBJECT_BYTES)
    out: dict[str, float] = {}
    for threads in (1, 4):
        keys = [f"ceiling/{threads}/{i}" for i in range(OBJECTS)]

        def put(key: str) -> None:
            client.put_object(Bucket=bucket, Key=key, Body=body, ContentLength=len(body))

        def get(key: str) -> None:
            client.get_object(Bucket=bucket, Key=key)["Body"].read()

        for verb, fn in (("put", put), ("get", get)):
            t0 = time.perf_counter()
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(fn, keys))
            out[f"{verb}_{threads}"] = OBJECTS * OBJECT_BYTES / (time.perf_counter() - t0) / 1e6
    rng = random.Random(6)
    took = []
    for _ in range(RANGE_READS):
        at = rng.randrange(0, OBJECT_BYTES - 65536)
        t0 = time.perf_counter()
        client.get_object(Bucket=bucket, Key="ceiling/1/0", Range=f"bytes={at}-{at + 65535}")[
            "Body"
        ].read()
        took.append(time.perf_counter() - t0)
    out["range_64k_ms"] = sorted(took)[len(took) // 2] * 1e3
    for threads in (1, 4):
        for i in range(OBJECTS):
            client.delete_object(Bucket=bucket, Key=f"ceiling/{threads}/{i}")
    return out


def _comb(location: str, image: str, workdir: str) -> dict[str, Any]:
    """Full backup, incremental after 1,000 x 4 KiB writes, restore: seconds and API calls."""
    out: dict[str, Any] = {}
    repo = Repository.init(location, password=BENCH_PASSWORD, encryption=ALGORITHM)
    work = os.path.join(workdir, "s3-work.img")
    sparse_copy(image, work)
    steps = ["full", "incremental", "restore"] + (["restore_1"] if is_s3(location) else [])
    for step in steps:
        before = s3_client.REQUESTS.snapshot()
        warm(work)
        if step == "full":
            run = backup(repo, work, "local", step, source_name="bench")
            seconds, data = run.wall_s, run.stats["bytes_read"]
        elif step == "incremental":
            change = change_scattered_writes(work)
            warm(work)
            run = backup(
                repo,
                work,
                "local",
                step,
                changed_extents=change.extents_path,
                source_name="bench",
            )
            seconds, data = run.wall_s, run.stats["bytes_read"]
            os.unlink(change.extents_path)
        else:
            repo = Repository.open(location, password=BENCH_PASSWORD)
            latest = max(repo.points(), key=lambda p: p.time)
            target = os.path.join(workdir, "s3-restored.img")
            # restore_1: one read in flight, one thread (what a restore that fetches chunk
            # after chunk does: the kopia case), against the default many.
            one = {"RESTORE_THREADS": 1, "INFLIGHT_READS": 1} if step == "restore_1" else {}
            saved = {k: getattr(restore_job, k) for k in one}
            for k, v in one.items():
                setattr(restore_job, k, v)
            try:
                got = restore(repo, latest.id, target, "restore", reference=work)
            finally:
                for k, v in saved.items():
                    setattr(restore_job, k, v)
            if not got.identical:
                raise SystemExit(f"bench s3: the restore from {location} differs from its source")
            seconds, data = got.wall_s, got.data_bytes
            os.unlink(target)
        after = s3_client.REQUESTS.snapshot()
        calls = {k: after.get(k, 0) - before.get(k, 0) for k in after}
        out[step] = {
            "seconds": seconds,
            "data_bytes": data,
            "requests": {k: v for k, v in sorted(calls.items()) if v},
        }
    os.unlink(work)
    out["first_read"] = _first_reads(location, workdir)
    return out


def _first_reads(location: str, workdir: str) -> dict[str, float]:
    """Seconds from starting ``comb serve`` to the first 4 KiB read of the latest point (in the
    middle of the disk) returning: with an empty cache of local copies (cold: the metadata the
    server needs is fetched), then again with what the first run kept (warm), median of 3."""
    repo = Repository.open(location, password=BENCH_PASSWORD)
    latest = max(repo.points(), key=lambda p: p.time)
    cache = os.path.join(workdir, "s3-first-read-cache")
    cold: list[float] = []
    hot: list[float] = []
    env = {"COMB_PASSWORD": BENCH_PASSWORD, "COMB_CACHE_DIR": cache}
    try:
        with mock.patch.dict(os.environ, env):  # (what the servers started here inherit)
            for _ in range(3):
                shutil.rmtree(cache, ignore_errors=True)
                for runs in (cold, hot):
                    export = f"bench@{latest.id}"
                    runs.append(first_read_seconds(location, export, latest.size // 2))
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return {"cold": statistics.median(cold), "warm": statistics.median(hot)}


def _measured_copy(source: Repository, target: Repository, point: RecoveryPoint) -> dict[str, Any]:
    """``comb copy`` of one point: seconds, data bytes read and the API calls it made."""
    before = s3_client.REQUESTS.snapshot()
    t0 = time.perf_counter()
    ((_, copy),) = list(copy_points(source, target, [point], lambda: make_engine("local")))
    seconds = time.perf_counter() - t0
    after = s3_client.REQUESTS.snapshot()
    if copy is None:
        raise SystemExit("bench s3: the copy found the point copied already")
    calls = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    return {
        "seconds": seconds,
        "data_bytes": copy.stats.bytes_read,
        "requests": {k: v for k, v in sorted(calls.items()) if v},
    }


def _copy(src: str, dst: str) -> dict[str, Any]:
    """``comb copy`` of the local repository's two points (full, then incremental) to S3."""
    Repository.init(dst, password=BENCH_PASSWORD, encryption=ALGORITHM)
    source = Repository.open(src, password=BENCH_PASSWORD)
    target = Repository.open(dst, password=BENCH_PASSWORD)
    points = sorted(source.points(), key=lambda p: (p.time, p.id))
    steps = zip(("full", "incremental"), points, strict=True)
    return {step: _measured_copy(source, target, point) for step, point in steps}


def _seeded(src: str, image: str, workdir: str) -> dict[str, Any]:
    """``comb copy`` of the first point into S3 repositories seeded with the same image by a
    backup of their own: with keys of their own ("separate"), and sharing the source's chunk
    ids ("shared", ``init --copy-keys-from``)."""
    source = Repository.open(src, password=BENCH_PASSWORD)
    first = min(source.points(), key=lambda p: (p.time, p.id))
    work = os.path.join(workdir, "s3-seed.img")
    sparse_copy(image, work)
    out: dict[str, Any] = {}
    try:
        for name, ids_from in (("separate", None), ("shared", source)):
            dst = f"s3://bench/seeded-{name}"
            Repository.init(dst, password=BENCH_PASSWORD, encryption=ALGORITHM, ids_from=ids_from)
            target = Repository.open(dst, password=BENCH_PASSWORD)
            backup(target, work, "local", "seed", source_name="seed")
            out[name] = _measured_copy(source, target, first)
    finally:
        os.unlink(work)
    return out


def _report(size: int, ceiling: dict[str, float], runs: dict[str, dict[str, Any]]) -> str:
    lines = [
        table(
            "ceiling: the same client and server without comb",
            ["figure", "1 in flight", "4 in flight"],
            [
                ["PUT 64 MiB objects (MB/s)", f"{ceiling['put_1']:.0f}", f"{ceiling['put_4']:.0f}"],
                ["GET 64 MiB objects (MB/s)", f"{ceiling['get_1']:.0f}", f"{ceiling['get_4']:.0f}"],
                ["GET of a 64 KiB range (ms, median)", f"{ceiling['range_64k_ms']:.1f}", ""],
            ],
        )
    ]
    rows = []
    for step in ("full", "incremental", "restore"):
        s3, local = runs["s3"][step], runs["local"][step]
        rows.append(
            [
                step,
                f"{s3['seconds']:.2f}",
                f"{s3['data_bytes'] / s3['seconds'] / 1e6:.0f}",
                f"{local['seconds']:.2f}",
                f"{local['data_bytes'] / local['seconds'] / 1e6:.0f}",
                f"{local['seconds'] / s3['seconds']:.2f}x",
            ]
        )
    lines.append(
        table(
            f"comb, {size / GIB:g} GiB mixed image (MB/s of data read or written)",
            ["step", "S3 s", "S3 MB/s", "local s", "local MB/s", "S3 / local speed"],
            rows,
        )
    )
    req_rows = []
    for step in ("full", "incremental", "restore"):
        calls = runs["s3"][step]["requests"]
        gib = runs["s3"][step]["data_bytes"] / GIB
        total = sum(calls.values())
        per = f"{total / gib:.0f}" if step != "incremental" and gib else ""
        detail = ", ".join(f"{k} {v}" for k, v in calls.items())
        req_rows.append([step, total, per, detail])
    for step in ("full", "incremental"):
        calls = runs["copy"][step]["requests"]
        seconds, data = runs["copy"][step]["seconds"], runs["copy"][step]["data_bytes"]
        detail = ", ".join(f"{k} {v}" for k, v in calls.items())
        req_rows.append([f"copy {step} ({seconds:.2f} s, {data / seconds / 1e6:.0f} MB/s)",
                         sum(calls.values()), "", detail])  # fmt: skip
    for name, label in (("separate", "keys of its own"), ("shared", "shared chunk ids")):
        seeded = runs["seeded"][name]
        calls = seeded["requests"]
        detail = ", ".join(f"{k} {v}" for k, v in calls.items())
        req_rows.append([f"copy full into a seeded target, {label} ({seeded['seconds']:.2f} s, "
                         f"{seeded['data_bytes'] / MIB:.0f} MiB read)",
                         sum(calls.values()), "", detail])  # fmt: skip
    lines.append(
        table("S3 API calls", ["step", "calls", "per GiB of data", "by operation"], req_rows)
    )
    one, many = runs["s3"]["restore_1"], runs["s3"]["restore"]
    in_flight = f"{restore_job.INFLIGHT_READS} ({restore_job.RESTORE_THREADS} threads)"
    lines.append(
        table(
            "restore from S3: reads in flight",
            ["reads in flight", "s", "MB/s"],
            [
                [label, f"{r['seconds']:.2f}", f"{r['data_bytes'] / r['seconds'] / 1e6:.0f}"]
                for label, r in (("1 (one thread)", one), (in_flight, many))
            ],
        )
    )
    lines.append(
        table(
            "comb serve: start to the first 4 KiB read of the latest point (s, median of 3)",
            ["repository", "empty cache of local copies", "copies kept"],
            [
                [where, f"{runs[key]['first_read']['cold']:.2f}",
                 f"{runs[key]['first_read']['warm']:.2f}"]
                for where, key in (("S3", "s3"), ("local directory", "local"))
            ],
        )
    )  # fmt: skip
    full, rest = runs["s3"]["full"], runs["s3"]["restore"]
    incr_calls = runs["s3"]["incremental"]["requests"]
    targets = [
        Target(
            "full backup to S3 / PUT ceiling (4 in flight)",
            full["data_bytes"] / full["seconds"] / 1e6 / ceiling["put_4"],
            ">=",
            0.8,
            "x",
            "data MB/s read from the image",
        ),
        Target(
            "restore from S3 / GET ceiling (4 in flight)",
            rest["data_bytes"] / rest["seconds"] / 1e6 / ceiling["get_4"],
            ">=",
            0.8,
            "x",
            "data MB/s written",
        ),
        Target(
            "incremental (1000 x 4 KiB): API calls",
            float(sum(incr_calls.values())),
            "<=",
            100,
            "",
            "tens, not thousands",
        ),
        Target(
            "incremental: LIST calls of packs or parity",
            float(
                sum(
                    v
                    for k, v in incr_calls.items()
                    if k in ("ListObjectsV2 packs", "ListObjectsV2 parity")
                )
            ),
            "<=",
            0,
            "",
            "",
        ),
    ]
    lines.append(targets_table(targets))
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench s3", description=__doc__)
    ap.add_argument("--size", default="1G")
    ap.add_argument("--workdir", default=DEFAULT_WORKDIR)
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args(argv)
    size = parse_size(args.size)
    os.makedirs(args.workdir, exist_ok=True)
    image = mixed_path(args.workdir, size)
    generate_image(mixed_spec(size), image)
    data = os.path.join(args.workdir, "s3-data")
    local = os.path.join(args.workdir, "s3-local-repo")
    for path in (data, local):
        shutil.rmtree(path, ignore_errors=True)
    proc, endpoint = _server(data)
    try:
        os.environ.update(
            AWS_ENDPOINT_URL=endpoint,
            AWS_ACCESS_KEY_ID="bench",
            AWS_SECRET_ACCESS_KEY="bench-secret",
            AWS_REGION="us-east-1",
        )
        client = s3_client.client_from_env()
        client.create_bucket(Bucket="bench")
        ceiling = _ceiling(client, "bench")
        runs = {
            "s3": _comb("s3://bench/repo", image, args.workdir),
            "local": _comb(local, image, args.workdir),
        }
        runs["copy"] = _copy(local, "s3://bench/copy")
        runs["seeded"] = _seeded(local, image, args.workdir)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        for path in (data, local):
            shutil.rmtree(path, ignore_errors=True)
    print("\n".join(header_lines(describe())))
    print(f"server: localbucket at {endpoint} (file-backed, data on the work directory's disk)")
    print(_report(size, ceiling, runs))
    doc = {"bench": "s3", "size": size, "ceiling": ceiling, "runs": runs}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(doc, fh, indent=2)
    print(json.dumps(doc))
    return 0
