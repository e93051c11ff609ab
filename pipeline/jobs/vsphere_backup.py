"""``comb backup vsphere://USER@HOST/DC/vm/NAME``: an agentless backup of a VMware VM.

One snapshot of the VM serves every disk backed up; each disk is its own source (and its own
recovery point), and the disks go through one engine run, read in parallel. What is read:

- first backup of a disk: the areas ``QueryChangedDiskAreas(changeId="*")`` says hold data;
- later backups: the areas changed since the parent point's ``changeId``, plus a random sample
  of the areas CBT calls unchanged (**verified CBT**, ``--cbt-audit PERCENT``): the sample's
  chunk ids must equal the parent's; a mismatch is reported loudly and recorded in the point,
  and the next backup of the disk reads everything;
- when the parent's change id is refused (CBT was reset), or the parent's audit failed: the
  whole disk's data again ("full-reread"), said on stderr.

The snapshot is removed when the backup ends, whether it succeeded or not.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from catalog.errors import SourceError, UsageError
from catalog.repo import Repository
from catalog.store.changes import ChangeTableWriter
from catalog.store.points import RecoveryPoint, last_vsphere_read, latest_for
from catalog.store.storage import Storage

from ..console import note, warn
from ..engines import Engine
from ..locking import writer_lock
from .plan import Range, align, subtract, total
from .runner import BackupOptions, BackupPlan, DiskJob, Progress, run_jobs
from .vsphere import CbtRefused, Vsphere, parse_url, session
from .vsphere_vm import DiskInfo, snapshot_disks, vm_config

DEFAULT_AUDIT_PERCENT = 1.0
# The audit samples whole leaves (1 MiB with the default chunk size): large ranged reads, and
# a sampled leaf's parent leaf is loaded once for all its chunks.
AUDIT_UNIT_CHUNKS = 16
# Offsets of mismatched chunks kept in the point document (the count is always exact).
MAX_MISMATCH_OFFSETS = 16


@dataclass(frozen=True)
class VsphereOptions:
    quiesce: bool = False
    disks: tuple[int, ...] = ()
    all_disks: bool = False
    cbt_audit: float = DEFAULT_AUDIT_PERCENT
    verify: bool | str = True
    password: str = field(default="", repr=False)  # the vCenter/ESXi user's


def audit_sample(size: int, unit: int, percent: float, rng: np.random.Generator) -> list[Range]:
    """``percent`` of the disk's ``unit``-sized pieces (at least one when percent > 0), sorted."""
    units = -(-size // unit)
    if percent <= 0 or units == 0:
        return []
    k = min(units, max(1, round(units * percent / 100)))
    picked = np.sort(rng.choice(units, size=k, replace=False))
    return align([(int(u) * unit, int(u) * unit + unit) for u in picked], unit, size)


class AuditedChanges(ChangeTableWriter):
    """The change table writer, also counting change rows inside the audited ranges: each is a
    chunk whose content changed although CBT called it unchanged."""

    def __init__(self, storage: Storage, audited: list[Range]) -> None:
        super().__init__(storage)
        self._starts = np.array([s for s, _ in audited], np.int64)
        self._ends = np.array([e for _, e in audited], np.int64)
        self.mismatched = 0
        self.mismatch_offsets: list[int] = []

    def add(
        self,
        offsets: np.ndarray,
        keys: np.ndarray,
        zero: np.ndarray,
        new: np.ndarray,
        stored: np.ndarray,
        lengths: np.ndarray,
    ) -> None:
        if len(self._starts) and len(offsets):
            i = np.searchsorted(self._starts, offsets, side="right") - 1
            inside = (i >= 0) & (offsets < self._ends[np.maximum(i, 0)])
            hits = offsets[inside]
            self.mismatched += len(hits)
            room = MAX_MISMATCH_OFFSETS - len(self.mismatch_offsets)
            self.mismatch_offsets.extend(int(o) for o in hits[:room])
        super().add(offsets, keys, zero, new, stored, lengths)


def _audit_failed(parent: RecoveryPoint) -> bool:
    doc = parent.vsphere or {}
    audit = (doc.get("cbt") or {}).get("audit") or {}
    return bool(audit.get("chunks_mismatched"))


@dataclass
class _DiskPlan:
    job: DiskJob
    disk: DiskInfo
    cbt: dict[str, Any]
    audited: list[Range]


def _plan_disk(
    repo: Repository,
    vs: Vsphere,
    vm: Any,
    snap: Any,
    disk: DiskInfo,
    name: str,
    vopts: VsphereOptions,
    cookie: str,
    make_fields: Any,
) -> _DiskPlan:
    chunk = repo.config.chunk_size
    source_name = f"vsphere://{vs.url.server}/{vs.url.path}/disk-{disk.key}"
    what = f"VM {name} disk {disk.key}"
    if disk.delta:
        raise SourceError(
            f"{what} ({disk.file}) is a delta disk on a snapshot chain; delete or consolidate "
            "the VM's other snapshots first"
        )
    if disk.capacity <= 0:
        raise SourceError(f"{what} ({disk.file}) reports no capacity")
    # The disk's last point read from vSphere, not an overlay's backup made since (FORMAT 8.6);
    # with none, the latest point (then no change id: the whole disk is read).
    points = repo.points()
    parent = last_vsphere_read(points, source_name) or latest_for(points, source_name)
    if parent is not None and disk.capacity < parent.size:
        raise SourceError(
            f"{what} is {disk.capacity} bytes, smaller than its parent recovery point "
            f"{parent.id} ({parent.size} bytes)"
        )
    cap = disk.capacity
    cbt: dict[str, Any] = {"query": None, "since_change_id": None, "reason": None}
    areas: list[Range] | None = None
    reason = None
    if parent is not None:
        if not disk.change_id:
            reason = "the snapshot's disk has no change id (CBT not active yet)"
        elif parent.change_id is None:
            reason = f"the parent point {parent.id} ({parent.source_path}) has no change id"
        elif _audit_failed(parent):
            reason = f"the CBT audit of the parent point {parent.id} found changes CBT missed"
        else:
            try:
                areas = vs.changed_areas(vm, snap, disk, parent.change_id, name)
                cbt.update(query="since", since_change_id=parent.change_id)
            except CbtRefused as err:
                reason = f"CBT reset: the change id of point {parent.id} was refused ({err})"
        if reason is not None:
            note(f"{what}: {reason}; reading the whole disk")
            cbt["reason"] = reason
    audited: list[Range] = []
    if areas is not None:
        assert parent is not None
        grown = [(parent.size, cap)] if cap > parent.size else []
        changed = align(areas + grown, chunk, cap)
        unit = chunk * AUDIT_UNIT_CHUNKS
        sample = audit_sample(parent.size, unit, vopts.cbt_audit, np.random.default_rng())
        audited = subtract(sample, changed)
        read = align(changed + audited, chunk, cap)
        cbt["bytes_reported"] = total(changed)
        plan = BackupPlan(source_name, cap, parent, "changed-extents", read, read)
    else:
        data: list[Range] = [(0, cap)]
        if disk.change_id:
            try:
                data = vs.changed_areas(vm, snap, disk, "*", name)
                cbt["query"] = "*"
            except CbtRefused as err:
                note(f"{what}: CBT cannot say where data is ({err}); reading the whole disk")
        read = align(data, chunk, cap)
        cbt["bytes_reported"] = total(read)
        mode = "full" if parent is None else "full-reread"
        plan = BackupPlan(source_name, cap, parent, mode, read, None)
    source = vs.disk_source(vm, disk, cookie)
    job = DiskJob(
        plan,
        source,
        f"vsphere://{vs.url.server}/{vs.url.path} [{disk.file}]",
        make_changes=lambda storage: AuditedChanges(storage, audited),
    )
    dp = _DiskPlan(job, disk, cbt, audited)
    job.fields = make_fields(dp)
    return dp


def _select(disks: list[DiskInfo], vopts: VsphereOptions, name: str) -> list[DiskInfo]:
    keys = ", ".join(f"{d.key} ({d.label})" for d in disks)
    if not disks:
        raise SourceError(f"VM {name} has no virtual disks")
    if vopts.all_disks:
        if vopts.disks:
            raise UsageError("give --disk KEY or --all-disks, not both")
        return disks
    if vopts.disks:
        by_key = {d.key: d for d in disks}
        missing = [k for k in vopts.disks if k not in by_key]
        if missing:
            raise UsageError(f"VM {name} has no disk {missing[0]}; its disks: {keys}")
        return [by_key[k] for k in dict.fromkeys(vopts.disks)]
    if len(disks) > 1:
        raise UsageError(
            f"VM {name} has {len(disks)} disks ({keys}): give --disk KEY or --all-disks"
        )
    return disks


def run_vsphere_backup(
    repo: Repository,
    source: str,
    engine: Engine,
    opts: BackupOptions,
    vopts: VsphereOptions,
    progress: Progress | None = None,
) -> list[RecoveryPoint]:
    repo.require_writable()
    if opts.source_name is not None or opts.changed_extents is not None:
        raise UsageError(
            "--source-name and --changed-extents do not apply to a vsphere:// source (each "
            "disk is named after the VM and its key; Changed Block Tracking gives the changes)"
        )
    if not 0 <= vopts.cbt_audit <= 100:
        raise UsageError("--cbt-audit must be a percentage between 0 and 100")
    url = parse_url(source)
    with writer_lock(repo, "backup") as lock, session(url, vopts.password, vopts.verify) as vs:
        vm = vs.find_vm()
        name = str(vm.name)
        if vs.ensure_cbt(vm, name):
            note(f"enabled Changed Block Tracking on VM {name}")
        for left in vs.remove_leftovers(vm, name):
            note(f"removed snapshot {left} of VM {name}, left by a comb backup that was killed")
        snap, snap_name = vs.snapshot(vm, name, vopts.quiesce)
        ok = False
        try:
            config = vm_config(vm, vs.datacenter_path(vm))
            disks = _select(snapshot_disks(snap), vopts, name)
            cookie = vs.cookie()

            def make_fields(dp: _DiskPlan) -> Any:
                def fields(changes: ChangeTableWriter) -> dict[str, Any]:
                    assert isinstance(changes, AuditedChanges)
                    cbt = dict(dp.cbt)
                    if cbt.get("query") == "since":
                        cbt["audit"] = {
                            "percent": vopts.cbt_audit,
                            "bytes_sampled": total(dp.audited),
                            "chunks_mismatched": changes.mismatched,
                            "mismatch_offsets": changes.mismatch_offsets,
                        }
                    return {
                        "change_id": dp.disk.change_id,
                        "vsphere": {
                            "server": url.server,
                            "path": url.path,
                            "vm": config,
                            "disk": {
                                "key": dp.disk.key,
                                "label": dp.disk.label,
                                "file": dp.disk.file,
                                "capacity": dp.disk.capacity,
                            },
                            "snapshot": {"name": snap_name, "quiesced": vopts.quiesce},
                            "cbt": cbt,
                        },
                    }

                return fields

            plans = [
                _plan_disk(repo, vs, vm, snap, d, name, vopts, cookie, make_fields) for d in disks
            ]
            with vs.keepalive():
                points = run_jobs(repo, [p.job for p in plans], engine, opts, progress, lock=lock)
            ok = True
        finally:
            try:
                vs.remove_snapshot(snap, name)
            except SourceError as err:
                if ok:
                    ids = ", ".join(p.id for p in points)
                    raise SourceError(
                        f"the backup is committed (recovery point {ids}), but the snapshot "
                        f"{snap_name} is left: {err}"
                    ) from None
                warn(f"snapshot {snap_name} is left: {err}")
    for p, dp in zip(points, plans, strict=True):
        audit = (p.vsphere or {}).get("cbt", {}).get("audit") or {}
        if audit.get("chunks_mismatched"):
            warn(
                f"CBT audit of VM {name} disk {dp.disk.key}: "
                f"{audit['chunks_mismatched']} sampled chunk(s) changed although Changed Block "
                f"Tracking reported them unchanged (first at offset "
                f"{audit['mismatch_offsets'][0]}); recovery point {p.id} may miss other "
                "changes, and the next backup of this disk reads the whole disk",
                loud=True,
            )
    return points
