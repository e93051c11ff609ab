"""``comb backup SOURCE [SOURCE ...]``: an image file, block device, overlay or vSphere VM as a
new recovery point, or several image files and devices in one engine run, a point each (the
jobs are ``pipeline.jobs.backup`` and ``pipeline.jobs.vsphere_backup``)."""

from __future__ import annotations

import argparse
import json
import os
import time

from catalog.errors import CombError, OutputError, SourceError, UsageError
from catalog.repo import Repository
from catalog.store.points import RecoveryPoint

from ..console import human_bytes, human_rate, note, print_json, warn
from ..engines import MAX_INDEX_SHARDS, Engine, make_engine
from ..jobs.backup import run_backup, run_backups
from ..jobs.overlay_source import overlay_name
from ..jobs.runner import BackupOptions
from ..jobs.vsphere import is_vsphere
from ..jobs.vsphere_backup import DEFAULT_AUDIT_PERCENT, VsphereOptions, run_vsphere_backup
from ..profile import stage_seconds, timeline_events
from . import Subparsers, command
from .catalog_cmd import index_after_backup
from .output import open_output
from .passwords import VSPHERE_PASSWORD_ENV, vsphere_password
from .points_cmd import TAG_RULE, check_tag, point_summary
from .progress import progress_bar

# Work items are read into one buffer per worker: bound it (1 GiB per worker at most).
MAX_BATCH_MIB = 1024


def add_parser(sub: Subparsers) -> None:
    s = command(
        sub,
        "backup",
        "back up a disk image, block device, overlay or vSphere VM as a new recovery point",
        [
            "comb -r /backup/repo backup /var/lib/images/web01.img",
            "comb -r /backup/repo backup /dev/vg0/db --source-name db --changed-extents c.json",
            "comb backup overlay:try1 -r /backup/repo --engine local --json",
            "comb -r /backup/repo backup vsphere://backup@vc.example/DC0/vm/db01 --all-disks",
            "comb -r /backup/repo backup web01.img --tag nightly --description 'before upgrade'",
            "comb -r /backup/repo backup /var/lib/images/*.img /dev/vg0/db",
        ],
        json="print each new point as one JSON line (a VM: one per disk); status lines on stderr",
    )
    s.add_argument(
        "source",
        nargs="+",
        help="image file, block device, overlay:NAME, or vsphere://USER@HOST/DC/vm/NAME; several "
        "image files and devices: one engine run, a point each",
    )
    s.add_argument("--source-name", help="name of the source (default: its absolute path)")
    s.add_argument(
        "--tag",
        action="append",
        default=[],
        metavar="TAG",
        help=f"label the new point (repeatable; {TAG_RULE}); `points --tag` finds it",
    )
    s.add_argument("--description", metavar="TEXT", help="a description of the new point")
    s.add_argument(
        "--no-files",
        action="store_true",
        help="skip the file catalog of the new point (`comb index` builds it later)",
    )
    s.add_argument(
        "--changed-extents",
        metavar="FILE",
        help="JSON list of {offset, length} changed since the parent: read only those",
    )
    add_engine_options(s)
    add_timeline_option(s)
    v = s.add_argument_group(
        f"vSphere (vsphere:// sources; password from {VSPHERE_PASSWORD_ENV} or a terminal)"
    )
    v.add_argument("--quiesce", action="store_true", help="quiesce the guest (VMware Tools)")
    v.add_argument(
        "--disk", type=int, action="append", default=[], metavar="KEY", help="disk device key"
    )
    v.add_argument("--all-disks", action="store_true", help="every disk, one source each")
    v.add_argument(
        "--cbt-audit",
        type=float,
        default=None,
        metavar="PERCENT",
        help="re-read this share of what CBT calls unchanged and check it (default 1)",
    )
    v.add_argument("--insecure", action="store_true", help="do not check the TLS certificate")
    v.add_argument("--ca-file", metavar="FILE", help="trust this CA bundle for TLS")
    s.set_defaults(run=cmd_backup)


def add_engine_options(s: argparse.ArgumentParser) -> None:
    """--engine, --ray-address, --workers and --batch-mib (backup, copy)."""
    s.add_argument(
        "--engine",
        choices=["ray", "local"],
        default=None,
        help="Ray actors (default; else COMB_ENGINE, or `engine` in the config file) or "
        "threads in this process",
    )
    s.add_argument(
        "--ray-address",
        default=None,
        help="existing Ray cluster (or RAY_ADDRESS); default: the Ray `ray start` runs on this "
        "machine if any, else comb's own; `local`: always comb's own",
    )
    s.add_argument("--workers", type=int, default=None, help="worker count (default: CPUs)")
    s.add_argument(
        "--index-shards",
        type=int,
        default=None,
        help="Ray: dedup index actors, each holding its share of the chunk ids (default: one "
        "per 8 workers, at most 16)",
    )
    s.add_argument("--batch-mib", type=int, default=16, help="work item size in MiB")


def add_timeline_option(s: argparse.ArgumentParser) -> None:
    s.add_argument(
        "--timeline",
        metavar="FILE",
        default=None,
        help="write the run's timeline there (chrome://tracing JSON: each stage's span per "
        "batch and worker, and Ray's own events)",
    )


def save_timeline(engine: Engine, args: argparse.Namespace) -> None:
    """The run's timeline into ``--timeline`` (after the report: the points are committed)."""
    if getattr(args, "timeline", None):
        with open_output(args.timeline, binary=False) as fh:  # (aside, then renamed)
            json.dump(timeline_events(engine.timeline), fh)


def engine_for(args: argparse.Namespace) -> Engine:
    """The engine the options, COMB_ENGINE or the config file name (checked options first)."""
    if not 1 <= args.batch_mib <= MAX_BATCH_MIB:
        raise UsageError(f"--batch-mib must be between 1 and {MAX_BATCH_MIB}")
    if args.workers is not None and args.workers < 1:
        raise UsageError("--workers must be at least 1")
    config = getattr(args, "config", None)
    configured = config.engine if config is not None else None
    name = args.engine or os.environ.get("COMB_ENGINE") or configured or "ray"
    shards = getattr(args, "index_shards", None)
    if shards is not None and not 1 <= shards <= MAX_INDEX_SHARDS:
        raise UsageError(f"--index-shards must be between 1 and {MAX_INDEX_SHARDS}")
    if shards is not None and name != "ray":
        raise UsageError("--index-shards applies to the ray engine (threads share one index)")
    engine = make_engine(name, args.ray_address, args.workers, shards or 0)
    timeline = getattr(args, "timeline", None)
    if timeline:
        folder = os.path.dirname(os.path.abspath(timeline))
        if not os.path.isdir(folder):
            raise UsageError(f"--timeline {timeline}: no folder {folder}")
        if os.path.isdir(timeline):
            raise UsageError(f"--timeline {timeline} is a folder (give a file's name)")
        engine.trace = True
    return engine


def say_engine(engine: Engine) -> None:
    """A note when the engine attached to a Ray running here, or could not."""
    attached, failed = getattr(engine, "attached", None), getattr(engine, "attach_failed", "")
    if attached:
        note(f"used the Ray running here at {attached} (`--ray-address local`: comb's own)")
    elif failed:
        note(f"could not use the Ray running here ({failed}): started comb's own")


def cmd_backup(repo: str, args: argparse.Namespace) -> int:
    r = Repository.open(repo, password=args.password)
    if args.source_name is not None and not args.source_name.strip():
        raise UsageError("--source-name must not be empty")
    if args.description is not None and not args.description.strip():
        raise UsageError("--description must not be empty")
    opts = BackupOptions(
        source_name=args.source_name,
        tags=tuple(dict.fromkeys(check_tag(t) for t in args.tag)),
        description=args.description,
        changed_extents=args.changed_extents,
        batch_bytes=args.batch_mib * 1024 * 1024,
    )
    sources: list[str] = args.source
    many = len(sources) > 1
    if many:
        _check_many(sources, args)
    args.source = sources[0]
    vopts = _vsphere_options(args)
    engine = engine_for(args)
    t0, cpu0 = time.perf_counter(), time.process_time()
    label = f"backup {len(sources)} sources" if many else f"backup {os.path.basename(sources[0])}"
    starting = "starting Ray ..." if engine.name == "ray" else "preparing ..."
    failed: list[tuple[str, CombError]] = []
    with progress_bar(label, args.json, starting=starting) as bar:
        if vopts is not None:
            points = run_vsphere_backup(r, args.source, engine, opts, vopts, bar)
        elif many:
            points, failed = run_backups(r, sources, engine, opts, bar)
        else:
            points = [run_backup(r, args.source, engine, opts, bar)]
    seconds = time.perf_counter() - t0
    driver_cpu = time.process_time() - cpu0  # (the threads' too on the local engine)
    say_engine(engine)
    if not args.json:
        for point in points:
            _report(point, engine, seconds, False)
    catalogs = {} if args.no_files else index_after_backup(r, points, args.json)
    if args.json:
        for point in points:
            _report(point, engine, seconds, True, catalogs.get(point.id), driver_cpu)
    for source, err in failed:
        warn(f"source {source} failed: {err.message}")
        if args.json:
            print_json({"source": source, "failed": err.message, "exit_code": err.exit_code})
    if failed:
        try:
            save_timeline(engine, args)
        except OutputError as err:  # (the sources that failed say more: their exit code wins)
            warn(err.message)
        raise SourceError(
            f"{len(failed)} of {len(sources)} sources failed (named above); "
            f"{len(points)} recovery point(s) committed"
        )
    save_timeline(engine, args)
    return 0


def _check_many(sources: list[str], args: argparse.Namespace) -> None:
    """Several sources in one run: image files and block devices only, named by their path."""
    for source in sources:
        if is_vsphere(source) or overlay_name(source) is not None:
            raise UsageError(f"{source}: a vSphere VM or an overlay is backed up on its own")
    for flag, value in (
        ("--source-name", args.source_name),
        ("--changed-extents", args.changed_extents),
    ):
        if value is not None:
            raise UsageError(f"{flag} applies to a single source")


def _vsphere_options(args: argparse.Namespace) -> VsphereOptions | None:
    """The vSphere options, or None (and none of them given) for other sources."""
    if not is_vsphere(args.source):
        given = [
            flag
            for flag, value in (
                ("--quiesce", args.quiesce),
                ("--disk", args.disk),
                ("--all-disks", args.all_disks),
                ("--cbt-audit", args.cbt_audit is not None),
                ("--insecure", args.insecure),
                ("--ca-file", args.ca_file),
            )
            if value
        ]
        if given:
            raise UsageError(f"{given[0]} applies to vsphere:// sources only")
        return None
    if args.insecure and args.ca_file:
        raise UsageError("give --insecure or --ca-file, not both")
    return VsphereOptions(
        quiesce=args.quiesce,
        disks=tuple(args.disk),
        all_disks=args.all_disks,
        cbt_audit=DEFAULT_AUDIT_PERCENT if args.cbt_audit is None else args.cbt_audit,
        verify=False if args.insecure else (args.ca_file or True),
        password=vsphere_password(),
    )


def _report(
    point: RecoveryPoint,
    engine: Engine,
    seconds: float,
    as_json: bool,
    catalog: dict[str, object] | None = None,
    driver_cpu: float = 0.0,
) -> None:
    st = point.stats
    if as_json:  # one line per point (JSON Lines): a VM backup makes one point per disk
        doc = {**point_summary(point), "engine_startup_seconds": round(engine.startup_s, 3)}
        # The engine run's own profile (every disk of the run): CPU seconds per stage and part.
        doc["stage_cpu_seconds"] = {
            k.replace(" ", "_"): round(v, 6) for k, v in engine.cpu_by_stage.items()
        }
        doc["stage_seconds"] = stage_seconds(engine.cpu_by_stage, engine.wall_by_stage)
        doc["driver_cpu_seconds"] = round(driver_cpu, 3)
        doc["file_catalog"] = catalog
        if point.vsphere is not None:
            doc.update(change_id=point.change_id, cbt=point.vsphere.get("cbt"))
        print_json(doc)
    else:
        startup = f", engine start-up {engine.startup_s:.1f} s" if engine.startup_s >= 0.5 else ""
        print(
            f"recovery point {point.id} of {point.source} ({point.mode}): "
            f"read {human_bytes(st.bytes_read)}, new {human_bytes(st.bytes_new)}, "
            f"stored {human_bytes(st.bytes_stored)} in {seconds:.1f} s "
            f"({human_rate(st.bytes_read, seconds)} read, {point.engine} engine{startup})"
        )
