"""A job file's sources as a run sees them (``job_cmd``, ``job_serve``, ``report rpo --job``,
``dashboard --job``): globs of VMs listed through vSphere (``list_vms``) or among the VMs with
points here (``vms_with_points``), each VM's options for ``backup``, the vSphere password asked
once a process, and each source's RPO target as the points name it (``job_targets``).

Owns those. Must not: parse job files (``pipeline.jobs.jobfile``) or back anything up.
"""

from __future__ import annotations

from collections.abc import Callable
from fnmatch import fnmatchcase
from functools import cache

from catalog.store.points import RecoveryPoint

from ..jobs.jobfile import JobSource, expand, load_job
from ..jobs.vsphere import is_vsphere, parse_url, vm_matches
from ..jobs.vsphere_backup import DEFAULT_AUDIT_PERCENT, VsphereOptions
from .passwords import vsphere_password


def job_targets(file: str | None, points: list[RecoveryPoint]) -> tuple[tuple[str, float], ...]:
    """Each source of job file ``file`` with an ``every``, as the points name it: (name,
    seconds); a VM by each of its disks (its points' names), globs by what they matched."""
    if not file:
        return ()
    sources, _ = expand(load_job(file), vms_with_points(points))
    names = sorted({p.source for p in points})
    out: list[tuple[str, float]] = []
    for src in (s for s in sources if s.every_s is not None):
        every = float(src.every_s or 0)
        disks = [n for n in names if n.startswith(f"{src.name}/disk-")] if src.vsphere else []
        out += [(d, every) for d in disks] or [(src.name, every)]
    return tuple(out)


@cache
def vsphere_password_once() -> str:
    """Asked once a process (a server's rounds reuse it)."""
    return vsphere_password()


def vm_opts(vm: JobSource) -> VsphereOptions:
    o = vm.vsphere or {}
    return VsphereOptions(
        quiesce=o.get("quiesce", False), disks=tuple(o.get("disks", ())),
        all_disks=o.get("all_disks", False),
        cbt_audit=float(o.get("cbt_audit", DEFAULT_AUDIT_PERCENT)),
        verify=False if o.get("insecure") else o.get("ca_file", True),
        password=vsphere_password_once(),
    )  # fmt: skip


def list_vms(src: JobSource) -> list[tuple[str, str]]:
    """The VMs a glob of VMs matches now, asked of vSphere: (address, name)."""
    return [(url, vm_name(url)) for url in vm_matches(src.path, vsphere_password_once(),
                                                      vm_opts(src).verify)]  # fmt: skip


def vm_name(url: str) -> str:
    vm = parse_url(url)
    return f"vsphere://{vm.server}/{vm.path}"


def vms_with_points(points: list[RecoveryPoint]) -> Callable[[JobSource], list[tuple[str, str]]]:
    """A lister of the VMs a glob matches among those with points here (no vSphere asked:
    ``job status``, ``report rpo --job``)."""
    vms = sorted({p.source.rsplit("/disk-", 1)[0] for p in points if is_vsphere(p.source)})

    def listed(src: JobSource) -> list[tuple[str, str]]:
        folder, name = src.name.rsplit("/", 1)
        return [
            (vm, vm)
            for vm in vms
            if vm.rsplit("/", 1)[0] == folder and fnmatchcase(vm.rsplit("/", 1)[1], name)
        ]

    return listed
