"""``python -m bench vsphere``: agentless VM backups from the vSphere simulator, against the
same bytes backed up from a local file in the same run.

A VM with one disk (default 4 GiB) is made in the project's vcsim build (tests/vcsim); the
mixed image is written into the disk's flat file. Then: a full backup over the datastore's HTTPS
``/folder`` interface (CBT "*" decides what is read), two guest changes (1,000 scattered 4 KiB
writes; 5 % of 64 KiB blocks rewritten), each followed by a CBT incremental. The baseline is the
same flat file backed up as a local image (full, then ``--changed-extents`` with the exact
change list) on the same engine. MB/s is disk size / wall time for fulls, bytes read / wall for
incrementals; "read / changed" is what the incremental read against what the guest wrote
(chunk rounding and the CBT audit's sample are the difference). The simulator's own cost (it
fingerprints the whole disk at every snapshot, which real ESXi does not) is measured apart.
Must not: judge targets.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from catalog.repo import Repository
from pipeline.engines import make_engine
from pipeline.jobs.runner import BackupOptions
from pipeline.jobs.vsphere_backup import DEFAULT_AUDIT_PERCENT, VsphereOptions, run_vsphere_backup

from .image import (
    GIB,
    ChangeSet,
    change_block_rewrites,
    change_scattered_writes,
    generate_image,
    mixed_spec,
    parse_size,
    warm,
)
from .machine import DEFAULT_WORKDIR, describe, header_lines
from .report import table
from .runs import BENCH_PASSWORD, backup, fresh_repo

_TESTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")


def _vcsim() -> Any:
    if _TESTS not in sys.path:
        sys.path.insert(0, _TESTS)
    import vcsimtest

    return vcsimtest


def _vsphere(
    repo: Repository, url: str, engine: str, cafile: str, audit: float, password: str
) -> Any:
    eng = make_engine(engine)
    vopts = VsphereOptions(verify=cafile, cbt_audit=audit, password=password)
    t0 = time.perf_counter()
    (point,) = run_vsphere_backup(repo, url, eng, BackupOptions(), vopts)
    return point, time.perf_counter() - t0


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench vsphere", description=__doc__)
    ap.add_argument("--size", default="4G", help="VM disk size (default 4G)")
    ap.add_argument("--engine", default="local", choices=["local", "ray"])
    ap.add_argument("--cbt-audit", type=float, default=DEFAULT_AUDIT_PERCENT)
    ap.add_argument("--workdir", default=DEFAULT_WORKDIR)
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args(argv)
    size = parse_size(args.size)
    work = os.path.join(args.workdir, "vsphere")
    os.makedirs(work, exist_ok=True)
    vc = _vcsim()
    binary = vc.build()
    rows: list[list[str]] = []
    figures: dict[str, Any] = {"size": size, "engine": args.engine}
    with vc.Simulator(os.path.join(work, "sim"), binary=binary) as sim:
        si = sim.connect()
        vm = vc.create_vm(si, f"bench-{os.getpid()}", [size])
        flat = str(vm.disks[0].flat_path)
        info = generate_image(mixed_spec(size), flat)
        warm(flat)
        url = f"vsphere://{sim.username}@{sim.host}:{sim.port}/{vm.inventory_path}"
        base_repo = fresh_repo(os.path.join(work, "repo-file"))
        vs_repo = fresh_repo(os.path.join(work, "repo-vsphere"))

        base = backup(base_repo, flat, args.engine, "file full", source_name="disk")
        point, wall = _vsphere(vs_repo, url, args.engine, sim.cafile, args.cbt_audit, sim.password)
        runs: list[tuple[str, float, float, float, int, int, int]] = [
            ("full", size, base.wall_s, wall, point.stats.bytes_read, 0, 0)
        ]
        figures["full"] = {
            "file_s": base.wall_s,
            "vsphere_s": wall,
            "bytes_read": point.stats.bytes_read,
        }
        for make_change in (change_scattered_writes, change_block_rewrites):
            ch: ChangeSet = make_change(flat)  # the guest writes, then the backups run
            warm(flat)
            b = backup(
                Repository.open(base_repo.location, password=BENCH_PASSWORD),
                flat,
                args.engine,
                ch.name,
                changed_extents=ch.extents_path,
                source_name="disk",
            )
            p, w = _vsphere(
                Repository.open(vs_repo.location, password=BENCH_PASSWORD),
                url,
                args.engine,
                sim.cafile,
                args.cbt_audit,
                sim.password,
            )
            audit = (p.vsphere or {}).get("cbt", {}).get("audit", {})
            read = p.stats.bytes_read
            runs.append(
                (
                    f"incremental {ch.name}",
                    b.stats["bytes_read"],
                    b.wall_s,
                    w,
                    read,
                    ch.bytes_written,
                    audit.get("bytes_sampled", 0),
                )
            )
            figures[ch.name] = {
                "file_s": b.wall_s,
                "vsphere_s": w,
                "bytes_read": read,
                "bytes_written_by_guest": ch.bytes_written,
                "audit_bytes": audit.get("bytes_sampled", 0),
                "audit_mismatched": audit.get("chunks_mismatched", 0),
            }
        # The simulator's own share: a snapshot fingerprints the whole disk (ESXi does not).
        t0 = time.perf_counter()
        snap = vc.wait(vm.vm.CreateSnapshot_Task(name="t", memory=False, quiesce=False))
        snap_s = time.perf_counter() - t0
        vc.wait(snap.RemoveSnapshot_Task(removeChildren=False))
        figures["simulator_snapshot_s"] = snap_s
        vc.Simulator.disconnect(si)
    for label, file_bytes, file_s, vs_s, read, changed, audited in runs:
        net = max(vs_s - snap_s, 1e-9)  # without the simulator's fingerprinting
        full = label == "full"
        rows.append(
            [
                label,
                f"{file_bytes / file_s / 1e6:.0f}",
                f"{(size if full else read) / vs_s / 1e6:.0f}",
                f"{(size if full else read) / net / 1e6:.0f}",
                f"{vs_s / file_s:.2f}",
                f"{read / 1e6:.1f} MB",
                "" if full else f"{audited / 1e6:.1f} MB",
                "" if full else f"{changed / 1e6:.1f} MB",
                "" if full else f"{read / changed:.1f}",
            ]
        )
    print("\n".join(header_lines(describe())))
    print(f"disk: {info.summary()}")
    print(
        table(
            f"vSphere VM backup ({args.engine} engine, CBT audit {args.cbt_audit:g} %) "
            "vs the same flat file as a local image",
            [
                "backup",
                "file MB/s",
                "vSphere MB/s",
                "excl. sim",
                "time ratio",
                "read",
                "of it audit",
                "guest wrote",
                "read/wrote",
            ],
            rows,
        )
    )
    print(
        f"simulator: a snapshot takes {snap_s:.2f} s (it fingerprints the {size / GIB:.0f} GiB "
        "disk, which ESXi does not); 'excl. sim' leaves it out. The simulator runs on the same "
        "2 cores (serving HTTPS) as comb."
    )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(figures, fh, indent=2)
    return 0
