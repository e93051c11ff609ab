"""The vSphere control plane of a VM backup, through pyvmomi (no VDDK, no agent in the guest).

Connect, find the VM by inventory path, turn Changed Block Tracking on when it is off, take a
snapshot (quiesced when asked), ask ``QueryChangedDiskAreas`` (looping on ``startOffset``: the
server pages its answer), hand out each disk as a datastore source, and remove the snapshot.
Every vSphere fault becomes a one-line ``SourceError``. What the VM is made of (its disks, its
configuration) is read by ``pipeline.jobs.vsphere_vm``. Must not read disk data (the datastore
source does, ``stages.sources.datastore``) or touch the repository.
"""

from __future__ import annotations

import fnmatch
import http.client
import os
import re
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import psutil

from catalog.errors import SourceError, UsageError
from stages.sources.datastore import DatastoreDisk, tls_context

from .vsphere_vm import DiskInfo, vim_types

PREFIX = "vsphere://"
TASK_TIMEOUT_S = 3600.0
KEEPALIVE_S = 300.0  # vCenter drops sessions idle for 30 minutes by default

Range = tuple[int, int]


@dataclass(frozen=True)
class VsphereUrl:
    user: str
    host: str
    port: int
    path: str  # inventory path, e.g. "DC0/vm/NAME"

    @property
    def server(self) -> str:
        return self.host if self.port == 443 else f"{self.host}:{self.port}"


def is_vsphere(source: str) -> bool:
    return source.startswith(PREFIX)


def parse_url(source: str) -> VsphereUrl:
    """``vsphere://USER@HOST[:PORT]/DATACENTER/vm/[FOLDER/]NAME``."""
    parts = urlsplit(source)
    try:
        port = parts.port or 443
    except ValueError:
        raise UsageError(f"{source}: bad port") from None
    path = unquote(parts.path).strip("/")
    if parts.scheme != "vsphere" or not parts.hostname or not parts.username:
        raise UsageError(
            f"{source}: expected vsphere://USER@HOST[:PORT]/DATACENTER/vm/NAME (user and host)"
        )
    if len(path.split("/")) < 3 or "" in path.split("/"):
        raise UsageError(
            f"{source}: expected an inventory path DATACENTER/vm/[FOLDER/]NAME after the host"
        )
    return VsphereUrl(unquote(parts.username), parts.hostname, port, path)


def _fault(err: BaseException) -> str:
    """A vSphere fault in one line: its message, else its type."""
    msg = getattr(err, "msg", None) or getattr(err, "faultMessage", None)
    if isinstance(msg, list):  # faultMessage is a list of LocalizableMessage
        msg = "; ".join(str(getattr(m, "message", m)) for m in msg)
    name = type(err).__name__
    text = str(msg).strip().splitlines()[0] if msg else ""
    return f"{text} ({name})" if text else name


class Vsphere:
    """One logged-in session."""

    def __init__(self, url: VsphereUrl, pw: str, verify: bool | str) -> None:
        from pyVim.connect import SmartConnect

        vim = vim_types()
        self.url = url
        self.verify = verify
        ctx = tls_context(verify)
        where = f"vSphere at {url.server}"
        try:
            self.si = SmartConnect(
                host=url.host,
                port=url.port,
                user=url.user,
                pwd=pw,
                sslContext=ctx,
                httpConnectionTimeout=60,
            )
        except vim.fault.InvalidLogin:
            raise SourceError(
                f"{where}: login refused for user {url.user!r} (bad credentials)"
            ) from None
        except ssl.SSLCertVerificationError as err:
            raise SourceError(
                f"{where}: TLS certificate not trusted ({err.verify_message}); "
                "use --ca-file FILE or --insecure"
            ) from None
        except (OSError, http.client.HTTPException) as err:
            raise SourceError(f"cannot connect to {where}: {err}") from None
        except Exception as err:  # noqa: BLE001 - pyvmomi raises vmodl faults and more
            raise SourceError(f"{where}: cannot log in: {_fault(err)}") from None
        self.content = self.si.RetrieveContent()

    @contextmanager
    def keepalive(self, every_s: float = KEEPALIVE_S) -> Iterator[None]:
        """Keep the API session alive while the data is read (idle sessions expire, and the
        snapshot must still be removable at the end)."""
        stop = threading.Event()

        def run() -> None:
            while not stop.wait(every_s):
                try:
                    self.si.CurrentTime()
                except Exception:  # noqa: BLE001 - the removal at the end reports real trouble
                    pass

        thread = threading.Thread(target=run, name="comb-vsphere-keepalive", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def close(self) -> None:
        from pyVim.connect import Disconnect

        try:
            Disconnect(self.si)
        except Exception:  # noqa: BLE001 - logging out is best effort
            pass

    def cookie(self) -> str:
        jar: SimpleCookie = SimpleCookie()
        jar.load(self.si._stub.cookie)
        morsel = jar.get("vmware_soap_session")
        if morsel is None:
            raise SourceError(f"vSphere at {self.url.server}: the session has no cookie")
        return f"vmware_soap_session={morsel.coded_value}"

    def find_vm(self) -> Any:
        vim = vim_types()
        try:
            vm = self.content.searchIndex.FindByInventoryPath(self.url.path)
        except Exception as err:  # noqa: BLE001
            raise SourceError(f"cannot look up {self.url.path}: {_fault(err)}") from None
        if vm is None:
            raise SourceError(f"no VM at {self.url.path} on {self.url.server}")
        if not isinstance(vm, vim.VirtualMachine):
            raise SourceError(f"{self.url.path} on {self.url.server} is not a virtual machine")
        return vm

    def vm_names(self, folder: str, pattern: str) -> list[str]:
        """The names of the VMs right in inventory folder ``folder`` that match ``pattern``
        (fnmatch), sorted."""
        vim = vim_types()
        try:
            found = self.content.searchIndex.FindByInventoryPath(folder)
        except Exception as err:  # noqa: BLE001
            raise SourceError(f"cannot look up {folder}: {_fault(err)}") from None
        if found is None or not isinstance(found, vim.Folder):
            raise SourceError(f"no VM folder at {folder} on {self.url.server}")
        names = [str(c.name) for c in found.childEntity if isinstance(c, vim.VirtualMachine)]
        return sorted(n for n in names if fnmatch.fnmatchcase(n, pattern))

    def datacenter_path(self, vm: Any) -> str:
        """The inventory path of the VM's datacenter (the /folder URL's dcPath)."""
        vim = vim_types()
        node = vm.parent
        while node is not None and not isinstance(node, vim.Datacenter):
            node = node.parent
        if node is None:
            raise SourceError(f"VM {self.url.path} is in no datacenter")
        names = []
        while node is not None and node != self.content.rootFolder:
            names.append(node.name)
            node = node.parent
        return "/".join(reversed(names))

    def wait(self, task: Any, what: str) -> Any:
        deadline = time.monotonic() + TASK_TIMEOUT_S
        pause = 0.02
        while True:
            info = task.info
            if info.state == "success":
                return info.result
            if info.state == "error":
                raise SourceError(f"{what}: {_fault(info.error)}")
            if time.monotonic() > deadline:
                raise SourceError(f"{what}: the task did not finish in {TASK_TIMEOUT_S:.0f} s")
            time.sleep(pause)
            pause = min(0.2, pause * 1.5)

    def ensure_cbt(self, vm: Any, name: str) -> bool:
        """Turn Changed Block Tracking on; True when this call turned it on."""
        vim = vim_types()
        if vm.config.changeTrackingEnabled:
            return False
        if not vm.capability.changeTrackingSupported:
            raise SourceError(
                f"VM {name} does not support Changed Block Tracking "
                f"(virtual hardware {vm.config.version}; vmx-07 or later is needed)"
            )
        task = vm.ReconfigVM_Task(spec=vim.vm.ConfigSpec(changeTrackingEnabled=True))
        self.wait(task, f"cannot enable Changed Block Tracking on VM {name}")
        return True

    def snapshot(self, vm: Any, name: str, quiesce: bool) -> tuple[Any, str]:
        """(snapshot, its name)."""
        snap_name = "comb-" + datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        try:
            task = vm.CreateSnapshot_Task(
                name=snap_name,
                description=f"{SNAPSHOT_NOTE} (host {socket.gethostname()}, pid {os.getpid()})",
                memory=False,
                quiesce=quiesce,
            )
        except Exception as err:  # noqa: BLE001
            raise SourceError(f"cannot snapshot VM {name}: {_fault(err)}") from None
        return self.wait(task, f"cannot snapshot VM {name}"), snap_name

    def remove_leftovers(self, vm: Any, name: str) -> list[str]:
        """Remove the snapshots earlier comb backups on this host left behind (the process was
        killed before its clean-up); a comb snapshot of a live process, or of another host, is
        a backup running now: refuse. Returns the names removed."""
        removed = []
        for snap_name, desc, snap in _snapshot_tree(vm):
            m = _OURS.fullmatch(desc or "")
            if not snap_name.startswith("comb-") or m is None:
                continue
            host, pid = m.group(1), int(m.group(2))
            if host != socket.gethostname() or psutil.pid_exists(pid):
                raise SourceError(
                    f"VM {name} has snapshot {snap_name} of a comb backup running on host "
                    f"{host} (pid {pid}); wait for it, or remove the snapshot if that backup "
                    "is gone"
                )
            self.remove_snapshot(snap, name)
            removed.append(snap_name)
        return removed

    def remove_snapshot(self, snap: Any, name: str) -> None:
        try:
            task = snap.RemoveSnapshot_Task(removeChildren=False, consolidate=True)
        except Exception as err:  # noqa: BLE001
            raise SourceError(f"cannot remove snapshot of VM {name}: {_fault(err)}") from None
        self.wait(task, f"cannot remove snapshot of VM {name}")

    def changed_areas(
        self, vm: Any, snap: Any, disk: DiskInfo, change_id: str, name: str
    ) -> list[Range]:
        """``QueryChangedDiskAreas`` over the whole disk, following its pages."""
        out: list[Range] = []
        pos = 0
        while pos < disk.capacity:
            try:
                info = vm.QueryChangedDiskAreas(
                    snapshot=snap, deviceKey=disk.key, startOffset=pos, changeId=change_id
                )
            except Exception as err:  # noqa: BLE001 - the caller decides what a fault means
                raise CbtRefused(_fault(err)) from None
            for area in info.changedArea or []:
                out.append((int(area.start), int(area.start) + int(area.length)))
            nxt = int(info.startOffset) + int(info.length)
            if nxt <= pos:
                raise SourceError(
                    f"VM {name} disk {disk.key}: QueryChangedDiskAreas made no progress at "
                    f"offset {pos}"
                )
            pos = nxt
        return out

    def disk_source(self, vm: Any, disk: DiskInfo, cookie: str) -> DatastoreDisk:
        base = f"https://{self.url.host}:{self.url.port}/folder/"
        query = f"?dcPath={quote(self.datacenter_path(vm))}&dsName={quote(disk.datastore)}"
        return DatastoreDisk(
            url=base + quote(disk.flat_path()) + query,
            cookie=cookie,
            size=disk.capacity,
            label=f"disk {disk.key} ({disk.file})",
            verify=self.verify,
        )


SNAPSHOT_NOTE = "taken by comb for a backup; removed when the backup ends"
_OURS = re.compile(re.escape(SNAPSHOT_NOTE) + r" \(host (.+), pid (\d+)\)")


def _snapshot_tree(vm: Any) -> list[tuple[str, str, Any]]:
    """(name, description, snapshot) of every snapshot of the VM."""
    out: list[tuple[str, str, Any]] = []
    info = vm.snapshot
    todo = list(info.rootSnapshotList) if info is not None else []
    while todo:
        node = todo.pop()
        out.append((str(node.name), str(node.description or ""), node.snapshot))
        todo.extend(node.childSnapshotList or [])
    return out


class CbtRefused(Exception):
    """The server would not answer ``QueryChangedDiskAreas`` (e.g. a reset change id)."""


@contextmanager
def session(url: VsphereUrl, password: str, verify: bool | str) -> Iterator[Vsphere]:
    vs = Vsphere(url, password, verify)
    try:
        yield vs
    finally:
        vs.close()


def vm_matches(pattern: str, password: str, verify: bool | str) -> list[str]:
    """The addresses of the VMs a glob of VMs (``vsphere://USER@HOST/DC/vm/[FOLDER/]web*``:
    only the name may have one) matches in its folder, sorted by name."""
    url = parse_url(pattern)
    folder, name = url.path.rsplit("/", 1)
    with session(url, password, verify) as vs:
        names = vs.vm_names(folder, name)
    base = pattern[: len(pattern) - len(pattern.rsplit("/", 1)[1])]
    return [base + quote(n, safe="") for n in names]
