"""The vSphere test tooling itself: comb's vcsim build (patches + CBT extension) and vcsimtest."""

from __future__ import annotations

import os
from typing import Any

import pytest
import requests
from pyVim.task import WaitForTask
from pyVmomi import vim, vmodl
from vcsimtest import (
    CBT_PAGE_BYTES,
    Simulator,
    VmFactory,
    VmInfo,
    session_cookie,
    snapshots,
    vm_info,
    wait,
)

KiB = 1024
MiB = 1024 * KiB
BLOCK = 64 * KiB


def snapshot(info: VmInfo, name: str) -> Any:
    return wait(info.vm.CreateSnapshot_Task(name=name, memory=False, quiesce=True))


def disk_change_id(devices: list[vim.vm.device.VirtualDevice], key: int) -> str:
    (disk,) = [d for d in devices if d.key == key]
    backing: Any = disk.backing
    return str(backing.changeId)


def changed(
    info: VmInfo, snap: vim.vm.Snapshot, disk: int, change_id: str
) -> list[tuple[int, int]]:
    """All changed areas of a disk, following the answers' paging; adjacent areas merged."""
    capacity = next(d.capacity for d in info.disks if d.key == disk)
    areas: list[tuple[int, int]] = []
    start = pages = 0
    while start < capacity:
        r: Any = info.vm.QueryChangedDiskAreas(snap, disk, start, change_id)
        assert r.startOffset == start
        assert 0 < r.length <= min(CBT_PAGE_BYTES, capacity - start)
        for a in r.changedArea:
            assert start <= a.start and a.start + a.length <= start + r.length
            if areas and areas[-1][0] + areas[-1][1] == a.start:
                areas[-1] = (areas[-1][0], areas[-1][1] + a.length)
            else:
                areas.append((a.start, a.length))
        start += r.length
        pages += 1
    assert pages == -(-capacity // CBT_PAGE_BYTES)
    return areas


def test_wrong_password_is_refused(vcsim: Simulator) -> None:
    with pytest.raises(vim.fault.InvalidLogin):
        vcsim.connect(password="wrong")


def test_vm_disks_are_sparse_files_of_their_capacity(make_vm: VmFactory) -> None:
    size = 5 * MiB + 3 * 512
    info = make_vm([size, 2 * MiB], power_on=False)
    assert info.inventory_path.startswith("DC0/vm/")
    assert [d.key for d in info.disks] == [2000, 2001]
    disk = next(d for d in info.vm.config.hardware.device if d.key == 2000)
    assert disk.capacityInBytes == size
    st = os.stat(info.disks[0].flat_path)
    assert (st.st_size, st.st_blocks) == (size, 0)
    assert info.vm.runtime.powerState == "poweredOff"


def test_folder_needs_a_session_and_serves_ranges(
    vcsim: Simulator, vcsim_si: vim.ServiceInstance, make_vm: VmFactory
) -> None:
    info = make_vm([1 * MiB])
    disk = info.disks[0]
    disk.write(300_000, b"0123456789")
    url = vcsim.folder_url(disk.folder_path)
    assert requests.get(url, verify=vcsim.cafile, timeout=10).status_code == 401
    bad = {"vmware_soap_session": "not-a-session"}
    assert requests.get(url, verify=vcsim.cafile, cookies=bad, timeout=10).status_code == 401

    cookies = session_cookie(vcsim_si)
    r = requests.get(
        url,
        verify=vcsim.cafile,
        cookies=cookies,
        headers={"Range": "bytes=300002-300005"},
        timeout=10,
    )
    assert (r.status_code, r.content) == (206, b"2345")
    r = requests.head(url, verify=vcsim.cafile, cookies=cookies, timeout=10)
    assert (r.status_code, r.headers["Content-Length"]) == (200, str(MiB))

    other = vcsim.connect()
    cookies = session_cookie(other)
    assert requests.head(url, verify=vcsim.cafile, cookies=cookies, timeout=10).status_code == 200
    Simulator.disconnect(other)
    assert requests.head(url, verify=vcsim.cafile, cookies=cookies, timeout=10).status_code == 401


def test_cbt_answers_exactly_the_written_blocks(make_vm: VmFactory) -> None:
    size = 5 * MiB + 512  # a short last block
    info = make_vm([size, 2 * MiB], cbt=True)
    disk = info.disks[0]
    assert info.vm.capability.changeTrackingSupported is True
    disk.write(0, b"a")  # block 0
    disk.write(100_000, os.urandom(70_000))  # blocks 1-2
    disk.write(MiB - 10, b"x" * 20)  # blocks 15-16, across a page boundary
    disk.write(size - 1, b"z")  # the short last block
    s1 = snapshot(info, "s1")
    id1 = disk_change_id(s1.config.hardware.device, disk.key)
    assert id1 and id1 == disk_change_id(info.vm.config.hardware.device, disk.key)
    last = size // BLOCK * BLOCK
    assert changed(info, s1, disk.key, "*") == [
        (0, 3 * BLOCK),
        (15 * BLOCK, 2 * BLOCK),
        (last, size - last),
    ]
    assert changed(info, s1, info.disks[1].key, "*") == []

    disk.write(100_000, bytes(70_000))  # blocks 1-2 back to zeros
    disk.write(4 * MiB + 5, b"new")  # block 64
    s2 = snapshot(info, "s2")
    id2 = disk_change_id(s2.config.hardware.device, disk.key)
    assert id2 not in ("", id1)
    # The first snapshot kept its own device copies (and changeId).
    assert disk_change_id(s1.config.hardware.device, disk.key) == id1
    assert changed(info, s2, disk.key, id1) == [(BLOCK, 2 * BLOCK), (64 * BLOCK, BLOCK)]
    assert changed(info, s2, disk.key, id2) == []
    assert changed(info, s2, disk.key, "*") == [
        (0, BLOCK),
        (15 * BLOCK, 2 * BLOCK),
        (64 * BLOCK, BLOCK),
        (last, size - last),
    ]
    # startOffset inside a block: the answer starts there.
    r = info.vm.QueryChangedDiskAreas(s2, disk.key, 64 * BLOCK + 100, id1)
    assert [(a.start, a.length) for a in r.changedArea] == [(64 * BLOCK + 100, BLOCK - 100)]


def test_cbt_faults(make_vm: VmFactory) -> None:
    info = make_vm([MiB])
    disk = info.disks[0].key
    plain = snapshot(info, "no-cbt")
    with pytest.raises(vim.fault.FileFault):
        info.vm.QueryChangedDiskAreas(plain, disk, 0, "*")
    wait(info.vm.ReconfigVM_Task(vim.vm.ConfigSpec(changeTrackingEnabled=True)))
    snap = snapshot(info, "cbt")
    with pytest.raises(vmodl.fault.InvalidArgument) as e:
        info.vm.QueryChangedDiskAreas(snap, disk, 0, "52 00 11/4")
    assert e.value.invalidProperty == "changeId"
    with pytest.raises(vmodl.fault.InvalidArgument) as e:
        info.vm.QueryChangedDiskAreas(snap, 1000, 0, "*")  # the SCSI controller
    assert e.value.invalidProperty == "deviceKey"
    with pytest.raises(vmodl.fault.InvalidArgument) as e:
        info.vm.QueryChangedDiskAreas(snap, disk, MiB + 1, "*")
    assert e.value.invalidProperty == "startOffset"


def test_toggling_cbt_resets_change_ids(make_vm: VmFactory) -> None:
    info = make_vm([MiB], cbt=True)
    disk = info.disks[0].key
    s1 = snapshot(info, "s1")
    id1 = disk_change_id(s1.config.hardware.device, disk)
    s2 = snapshot(info, "s2")
    assert changed(info, s2, disk, id1) == []
    for on in (False, True):
        wait(info.vm.ReconfigVM_Task(vim.vm.ConfigSpec(changeTrackingEnabled=on)))
    s3 = snapshot(info, "s3")
    with pytest.raises(vmodl.fault.InvalidArgument):
        info.vm.QueryChangedDiskAreas(s3, disk, 0, id1)
    with pytest.raises(vim.fault.FileFault):
        info.vm.QueryChangedDiskAreas(s1, disk, 0, "*")
    assert changed(info, s3, disk, "*") == []


def test_remove_snapshot_through_wait_for_task(
    vcsim_si: vim.ServiceInstance, make_vm: VmFactory
) -> None:
    info = make_vm([MiB], cbt=True)
    assert info.vm.snapshot is None
    keep = snapshot(info, "keep")
    snap = snapshot(info, "backup")
    assert snapshots(vcsim_si, info) == ["keep", "backup"]
    task = snap.RemoveSnapshot_Task(removeChildren=False)
    WaitForTask(task)
    assert task.info.entity == info.vm
    assert snapshots(vcsim_si, info) == ["keep"]
    wait(keep.RevertToSnapshot_Task())  # also names the VM as its entity
    wait(keep.RemoveSnapshot_Task(removeChildren=False))
    assert info.vm.snapshot is None
    assert snapshots(vcsim_si, info) == []


def test_old_hardware_has_no_cbt(make_vm: VmFactory) -> None:
    info = make_vm([MiB], hw_version="vmx-04")
    assert info.vm.capability.changeTrackingSupported is False
    with pytest.raises(vmodl.fault.NotSupported) as e:
        wait(info.vm.ReconfigVM_Task(vim.vm.ConfigSpec(changeTrackingEnabled=True)))
    fault: Any = e.value
    assert "vmx-04" in fault.msg
    assert not info.vm.config.changeTrackingEnabled
    with pytest.raises(vmodl.fault.NotSupported):
        make_vm([MiB], hw_version="vmx-04", cbt=True)


def test_lying_cbt_hook(vcsim: Simulator, make_vm: VmFactory) -> None:
    info = make_vm([2 * MiB], cbt=True)
    disk = info.disks[0]
    disk.write(0, b"a" * (4 * BLOCK))
    s1 = snapshot(info, "s1")
    id1 = disk_change_id(s1.config.hardware.device, disk.key)
    disk.write(0, b"b" * (4 * BLOCK))
    s2 = snapshot(info, "s2")
    vcsim.lie_cbt(info, disk.key, BLOCK + 1, 10, which="incremental")
    assert changed(info, s2, disk.key, id1) == [(0, BLOCK), (2 * BLOCK, 2 * BLOCK)]
    assert changed(info, s2, disk.key, "*") == [(0, 4 * BLOCK)]
    vcsim.clear_hooks()
    assert changed(info, s2, disk.key, id1) == [(0, 4 * BLOCK)]
    with pytest.raises(RuntimeError, match="no VM"):
        vcsim.lie_cbt("vm-0", disk.key, 0, 1)


def test_fail_next_snapshot_hook(
    vcsim: Simulator, vcsim_si: vim.ServiceInstance, make_vm: VmFactory
) -> None:
    info = make_vm([MiB], cbt=True)
    vcsim.fail_next_snapshot(info, "quiescing the guest failed", fault="ApplicationQuiesceFault")
    with pytest.raises(vim.fault.ApplicationQuiesceFault) as e:
        snapshot(info, "s1")
    fault: Any = e.value
    assert fault.msg == "quiescing the guest failed"
    assert snapshots(vcsim_si, info) == []
    snapshot(info, "s2")  # only the next one fails
    assert snapshots(vcsim_si, info) == ["s2"]
    with pytest.raises(RuntimeError, match="not a vSphere fault"):
        vcsim.fail_next_snapshot(info, fault="NoSuchFault")


def test_fail_folder_hook(
    vcsim: Simulator, vcsim_si: vim.ServiceInstance, make_vm: VmFactory
) -> None:
    info = make_vm([MiB])
    disk = info.disks[0]
    data = os.urandom(MiB)
    disk.write(0, data)
    url = vcsim.folder_url(disk.folder_path)
    cookies = session_cookie(vcsim_si)

    def get(first: int, last: int) -> requests.Response:
        headers = {"Range": f"bytes={first}-{last}"}
        return requests.get(url, verify=vcsim.cafile, cookies=cookies, headers=headers, timeout=10)

    vcsim.fail_folder(disk.folder_path, 500_000)
    assert get(0, 400_000).status_code == 206  # ends before the offset: not affected
    assert get(0, MiB - 1).status_code == 500
    assert get(0, MiB - 1).content == data  # count=1: used up

    vcsim.fail_folder(disk.folder_path, 500_000, mode="truncate", count=0)
    for _ in range(2):
        with pytest.raises(requests.exceptions.ChunkedEncodingError):
            get(400_000, MiB - 1)
    vcsim.clear_hooks()
    assert get(400_000, MiB - 1).content == data[400_000:]


def test_vm_info_describes_an_existing_vm(
    vcsim_si: vim.ServiceInstance, make_vm: VmFactory
) -> None:
    info = make_vm([MiB, 3 * MiB])
    content: Any = vcsim_si.RetrieveContent()
    found = content.searchIndex.FindByInventoryPath(info.inventory_path)
    assert found == info.vm
    assert vm_info(found) == info
