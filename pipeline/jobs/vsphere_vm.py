"""What a vSphere VM is made of, as comb records it: its disks and its configuration.

Owns ``DiskInfo`` (one virtual disk of a snapshot: key, capacity, backing file, datastore, CBT
change id), ``snapshot_disks`` (a snapshot's disks) and ``vm_config`` (CPUs, memory, disks,
NICs: what instant boot and an operator need to recreate the VM), read from pyVmomi objects;
``vim_types`` imports pyVmomi on first use. Must not act on the VM or hold a session: logging
in, snapshots, CBT and the data are ``pipeline.jobs.vsphere``'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


def vim_types() -> Any:
    """pyVmomi's ``vim`` namespace (imported on first use: only vSphere backups need it)."""
    from pyVmomi import vim

    return vim


@dataclass(frozen=True)
class DiskInfo:
    key: int
    label: str
    capacity: int
    file: str  # "[datastore] folder/name.vmdk"
    datastore: str
    change_id: str | None
    delta: bool  # the backing has a parent (a snapshot chain below it)

    def flat_path(self) -> str:
        """The flat extent's path inside the datastore (``name-flat.vmdk``)."""
        path = self.file.split("] ", 1)[1] if self.file.startswith("[") else self.file
        return path[: -len(".vmdk")] + "-flat.vmdk" if path.endswith(".vmdk") else path


def _capacity(dev: Any) -> int:
    """A virtual disk's size in bytes (older servers give only kilobytes)."""
    return int(dev.capacityInBytes or (dev.capacityInKB or 0) * 1024)


def _backing_file(dev: Any) -> str:
    return str(getattr(dev.backing, "fileName", "") or "")


def snapshot_disks(snap: Any) -> list[DiskInfo]:
    """The virtual disks of a snapshot, in device order."""
    vim = vim_types()
    out = []
    for dev in snap.config.hardware.device:
        if not isinstance(dev, vim.vm.device.VirtualDisk):
            continue
        backing = dev.backing
        file = _backing_file(dev)
        ds = file[1:].split("]", 1)[0] if file.startswith("[") else ""
        out.append(
            DiskInfo(
                key=int(dev.key),
                label=str(dev.deviceInfo.label if dev.deviceInfo else f"disk {dev.key}"),
                capacity=_capacity(dev),
                file=file,
                datastore=ds,
                change_id=getattr(backing, "changeId", None) or None,
                delta=getattr(backing, "parent", None) is not None,
            )
        )
    return out


def vm_config(vm: Any, dc_path: str) -> dict[str, Any]:
    """What instant boot and an operator need to recreate the VM: CPUs, memory, disks, NICs."""
    vim = vim_types()
    cfg = vm.config
    hw = cfg.hardware
    disks, nics = [], []
    for dev in hw.device:
        label = str(dev.deviceInfo.label) if dev.deviceInfo else ""
        if isinstance(dev, vim.vm.device.VirtualDisk):
            disks.append(
                {
                    "key": int(dev.key),
                    "label": label,
                    "capacity": _capacity(dev),
                    "file": _backing_file(dev),
                    "controller_key": int(dev.controllerKey or 0),
                    "unit": int(dev.unitNumber or 0),
                    "thin": bool(getattr(dev.backing, "thinProvisioned", False)),
                }
            )
        elif isinstance(dev, vim.vm.device.VirtualEthernetCard):
            backing = dev.backing
            network = getattr(backing, "deviceName", None) or getattr(
                getattr(backing, "port", None), "portgroupKey", None
            )
            nics.append(
                {
                    "key": int(dev.key),
                    "label": label,
                    "type": type(dev).__name__.rsplit(".", 1)[-1],
                    "mac": str(dev.macAddress or ""),
                    "network": str(network or ""),
                }
            )
    return {
        "name": str(cfg.name),
        "datacenter": dc_path,
        "instance_uuid": str(cfg.instanceUuid or ""),
        "bios_uuid": str(cfg.uuid or ""),
        "guest_id": str(cfg.guestId or ""),
        "hardware_version": str(cfg.version or ""),
        "firmware": str(cfg.firmware or "bios"),
        "cpus": int(hw.numCPU or 1),
        "cores_per_socket": int(hw.numCoresPerSocket or 1),
        "memory_mib": int(hw.memoryMB or 0),
        "disks": disks,
        "nics": nics,
    }
