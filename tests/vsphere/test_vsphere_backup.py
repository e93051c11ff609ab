"""``comb backup vsphere://...`` end to end against the simulator: CBT full and incremental
backups restore byte-identical, only changed areas are read, CBT resets and lying CBT answers
are caught, and the snapshot is always removed."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import pytest
from combtest import TEST_PASSWORD, CliRunner, MiB, api_restore, assert_one_line_error, cmp_files
from pyVmomi import vim
from vcsimtest import DiskInfo, Simulator, VmFactory, VmInfo, snapshots, wait

import drive.overlays.overlay as overlay
from catalog.repo import Repository
from drive.overlays.overlay import Overlay

CHUNK = 65536


@pytest.fixture(autouse=True)
def _password(vcsim: Simulator, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMB_VSPHERE_PASSWORD", vcsim.password)


def url(sim: Simulator, vm: VmInfo, user: str | None = None) -> str:
    return f"vsphere://{user or sim.username}@{sim.host}:{sim.port}/{vm.inventory_path}"


def backup(
    cli: CliRunner, repo: Path, sim: Simulator, vm: VmInfo, *args: object
) -> tuple[list[dict[str, Any]], str]:
    res = cli("-r", repo, "backup", url(sim, vm), "--ca-file", sim.cafile, *args, "--json")
    assert res.code == 0, res.err
    return [json.loads(line) for line in res.out.splitlines()], res.err


def scribble(disk: DiskInfo, rng: random.Random, places: list[int], length: int = 5000) -> None:
    for off in places:
        disk.write(off, rng.randbytes(length))


def chunks_touched(places: list[int], length: int = 5000) -> int:
    touched: set[int] = set()
    for off in places:
        touched.update(range(off // CHUNK, (off + length - 1) // CHUNK + 1))
    return len(touched) * CHUNK


def assert_restores(repo: Path, point_id: object, disk: DiskInfo, tmp_path: Path) -> None:
    out = tmp_path / f"{point_id}.img"
    api_restore(repo, str(point_id), out)
    cmp_files(out, disk.flat_path)


def test_full_then_cbt_incrementals(
    cli: CliRunner, repo_path: Path, vcsim: Simulator, make_vm: VmFactory, tmp_path: Path
) -> None:
    vm = make_vm([12 * MiB + 3 * CHUNK])
    disk = vm.disks[0]
    rng = random.Random(1)
    first = [0, 5 * MiB + 123, 9 * MiB]
    scribble(disk, rng, first)
    (p1,), err = backup(cli, repo_path, vcsim, vm)
    assert "enabled Changed Block Tracking" in err
    # The first backup reads only what CBT's "*" says holds data.
    assert p1["mode"] == "full" and p1["bytes_read"] == chunks_touched(first)
    assert p1["cbt"]["query"] == "*" and p1["change_id"]
    assert_restores(repo_path, p1["id"], disk, tmp_path)
    assert snapshots(vcsim.connect(), vm) == []
    as_first = tmp_path / "first.img"
    shutil.copyfile(disk.flat_path, as_first)

    # Changes on several CBT pages (1 MiB each): the client must follow startOffset.
    second = [CHUNK + 10, 7 * MiB, 12 * MiB + 2 * CHUNK]
    scribble(disk, rng, second)
    disk.write(9 * MiB, bytes(5000))  # a region zeroed again
    (p2,), err = backup(cli, repo_path, vcsim, vm, "--cbt-audit", "0")
    assert p2["mode"] == "changed-extents" and p2["parent"] == p1["id"]
    assert p2["bytes_read"] == chunks_touched(second + [9 * MiB])
    assert p2["change_id"] != p1["change_id"]
    assert_restores(repo_path, p2["id"], disk, tmp_path)
    api_restore(repo_path, str(p1["id"]), tmp_path / "p1-again.img")
    cmp_files(tmp_path / "p1-again.img", as_first)  # the first point is unchanged

    # Default audit: 1 % of the disk in whole leaves, minus what CBT reported: read as well.
    third = [11 * MiB]
    scribble(disk, rng, third)
    (p3,), _ = backup(cli, repo_path, vcsim, vm)
    audit = p3["cbt"]["audit"]
    assert audit["chunks_mismatched"] == 0 and audit["bytes_sampled"] > 0
    assert p3["bytes_read"] == chunks_touched(third) + audit["bytes_sampled"]
    assert p3["bytes_stored"] < 2 * CHUNK  # the sample is shared with the parent
    assert_restores(repo_path, p3["id"], disk, tmp_path)
    assert snapshots(vcsim.connect(), vm) == []

    doc = Repository.open(str(repo_path), password=TEST_PASSWORD).resolve(str(p3["id"]))
    assert doc.vsphere is not None
    assert doc.vsphere["vm"]["cpus"] == 1 and doc.vsphere["vm"]["memory_mib"] == 64
    assert doc.vsphere["disk"]["key"] == disk.key
    assert doc.source.endswith(f"/{vm.inventory_path}/disk-{disk.key}")


def test_cbt_reset_falls_back_to_full_read(
    cli: CliRunner, repo_path: Path, vcsim: Simulator, make_vm: VmFactory, tmp_path: Path
) -> None:
    vm = make_vm([4 * MiB], cbt=True)
    disk = vm.disks[0]
    rng = random.Random(2)
    scribble(disk, rng, [0, 3 * MiB])
    (p1,), _ = backup(cli, repo_path, vcsim, vm)
    si = vcsim.connect()
    for on in (False, True):  # toggling CBT resets it: the old change id is refused
        wait(vm.vm.ReconfigVM_Task(spec=vim.vm.ConfigSpec(changeTrackingEnabled=on)))
    scribble(disk, rng, [MiB])
    (p2,), err = backup(cli, repo_path, vcsim, vm)
    assert "CBT reset" in err and "reading the whole disk" in err
    assert p2["mode"] == "full-reread" and p2["parent"] == p1["id"]
    assert p2["bytes_read"] == chunks_touched([0, MiB, 3 * MiB])
    assert_restores(repo_path, p2["id"], disk, tmp_path)
    # And the chain continues with CBT from the new change id.
    scribble(disk, rng, [2 * MiB])
    (p3,), _ = backup(cli, repo_path, vcsim, vm, "--cbt-audit", "0")
    assert p3["mode"] == "changed-extents" and p3["bytes_read"] == CHUNK
    assert_restores(repo_path, p3["id"], disk, tmp_path)
    assert snapshots(si, vm) == []


def test_audit_catches_a_lying_cbt(
    cli: CliRunner, repo_path: Path, vcsim: Simulator, make_vm: VmFactory, tmp_path: Path
) -> None:
    vm = make_vm([4 * MiB])
    disk = vm.disks[0]
    rng = random.Random(3)
    scribble(disk, rng, [0, 2 * MiB])
    backup(cli, repo_path, vcsim, vm)
    scribble(disk, rng, [MiB, 3 * MiB])
    vcsim.lie_cbt(vm, disk.key, 3 * MiB, CHUNK, which="incremental")
    (p2,), err = backup(cli, repo_path, vcsim, vm, "--cbt-audit", "100")
    assert "WARNING: CBT audit" in err and "next backup of this disk reads the whole disk" in err
    audit = p2["cbt"]["audit"]
    assert audit["chunks_mismatched"] == 1 and audit["mismatch_offsets"] == [3 * MiB]
    # The audit read the hidden chunk, so this point is right; the next reads everything.
    assert_restores(repo_path, p2["id"], disk, tmp_path)
    scribble(disk, rng, [3 * MiB + CHUNK])
    (p3,), err = backup(cli, repo_path, vcsim, vm, "--cbt-audit", "0")
    assert "found changes CBT missed" in err and p3["mode"] == "full-reread"
    assert_restores(repo_path, p3["id"], disk, tmp_path)


def test_without_audit_a_lying_cbt_goes_unnoticed(
    cli: CliRunner, repo_path: Path, vcsim: Simulator, make_vm: VmFactory, tmp_path: Path
) -> None:
    """The control for the test above: the lie is real, only the audit catches it."""
    vm = make_vm([2 * MiB])
    disk = vm.disks[0]
    scribble(disk, random.Random(4), [0])
    backup(cli, repo_path, vcsim, vm)
    scribble(disk, random.Random(5), [MiB])
    vcsim.lie_cbt(vm, disk.key, MiB, CHUNK, which="incremental")
    (p2,), err = backup(cli, repo_path, vcsim, vm, "--cbt-audit", "0")
    assert "WARNING" not in err and p2["bytes_read"] == 0
    out = tmp_path / "r.img"
    api_restore(repo_path, str(p2["id"]), out)
    assert out.read_bytes() != disk.flat_path.read_bytes()


def test_an_overlay_backup_between_two_vm_backups(
    cli: CliRunner, repo_path: Path, vcsim: Simulator, make_vm: VmFactory, tmp_path: Path
) -> None:
    """The CBT parent is the disk's last point read from vSphere: a backup of an overlay of
    the VM's point (the source's latest point, without a change id) neither supplies the
    change id nor hides it."""
    vm = make_vm([4 * MiB])
    disk = vm.disks[0]
    rng = random.Random(9)
    scribble(disk, rng, [0, 2 * MiB])
    (p1,), _ = backup(cli, repo_path, vcsim, vm)
    r = Repository.open(str(repo_path), password=TEST_PASSWORD)
    overlay.create(r, "o1", r.resolve(str(p1["id"])))
    ov = Overlay(r, "o1")
    ov.write(0, b"\xab" * 4096)
    ov.close()
    res = cli("-r", repo_path, "backup", "overlay:o1", "--json")
    assert res.code == 0, res.err
    assert json.loads(res.out)["parent"] == p1["id"]
    scribble(disk, rng, [3 * MiB])
    (p3,), err = backup(cli, repo_path, vcsim, vm, "--cbt-audit", "0")
    assert p3["parent"] == p1["id"] and p3["mode"] == "changed-extents", err
    assert p3["cbt"]["query"] == "since" and p3["cbt"]["since_change_id"] == p1["change_id"]
    assert p3["bytes_read"] == chunks_touched([3 * MiB])
    point = Repository.open(str(repo_path), password=TEST_PASSWORD).resolve(str(p3["id"]))
    assert point.vsphere is not None and point.vsphere["cbt"]["query"] == "since"
    assert_restores(repo_path, p3["id"], disk, tmp_path)


def test_a_vm_backup_whose_only_earlier_point_is_an_overlays(
    cli: CliRunner, repo_path: Path, vcsim: Simulator, make_vm: VmFactory, tmp_path: Path
) -> None:
    """With no point read from vSphere left, the disk's latest point is the parent; it has no
    change id, so the whole disk is read."""
    vm = make_vm([2 * MiB])
    disk = vm.disks[0]
    scribble(disk, random.Random(10), [0])
    (p1,), _ = backup(cli, repo_path, vcsim, vm)
    r = Repository.open(str(repo_path), password=TEST_PASSWORD)
    overlay.create(r, "o1", r.resolve(str(p1["id"])))
    res = cli("-r", repo_path, "backup", "overlay:o1", "--json")
    assert res.code == 0, res.err
    p2 = json.loads(res.out)["id"]
    for args in (("overlays", "rm", "o1"), ("forget", p1["id"])):
        assert cli("-r", repo_path, *args).code == 0
    scribble(disk, random.Random(11), [MiB])
    (p3,), err = backup(cli, repo_path, vcsim, vm)
    assert f"{p2} (overlay:o1) has no change id" in err
    assert p3["parent"] == p2 and p3["mode"] == "full-reread" and p3["cbt"]["query"] == "*"
    assert_restores(repo_path, p3["id"], disk, tmp_path)


def test_multi_disk_vm(
    cli: CliRunner, repo_path: Path, vcsim: Simulator, make_vm: VmFactory, tmp_path: Path
) -> None:
    vm = make_vm([3 * MiB, 2 * MiB + CHUNK])
    rng = random.Random(6)
    for d in vm.disks:
        scribble(d, rng, [0, MiB + 17])
    res = cli("-r", repo_path, "backup", url(vcsim, vm), "--ca-file", vcsim.cafile)
    assert_one_line_error(res, "2 disks", "--all-disks", str(vm.disks[1].key), code=2)
    points, _ = backup(cli, repo_path, vcsim, vm, "--all-disks", "--quiesce")
    assert [p["source"] for p in points] == [
        f"vsphere://{vcsim.host}:{vcsim.port}/{vm.inventory_path}/disk-{d.key}" for d in vm.disks
    ]
    repo = Repository.open(str(repo_path), password=TEST_PASSWORD)
    for p, d in zip(points, vm.disks, strict=True):
        assert_restores(repo_path, p["id"], d, tmp_path)
        doc = repo.resolve(p["id"]).vsphere
        assert doc is not None and doc["snapshot"]["quiesced"] is True
        assert [x["key"] for x in doc["vm"]["disks"]] == [x.key for x in vm.disks]
    scribble(vm.disks[1], rng, [2 * MiB])
    (p,), _ = backup(cli, repo_path, vcsim, vm, "--disk", vm.disks[1].key, "--cbt-audit", "0")
    assert p["parent"] == points[1]["id"] and p["bytes_read"] == CHUNK
    assert_restores(repo_path, p["id"], vm.disks[1], tmp_path)
    assert snapshots(vcsim.connect(), vm) == []


def test_ray_engine(
    cli: CliRunner, repo_path: Path, vcsim: Simulator, make_vm: VmFactory, tmp_path: Path
) -> None:
    """The default engine: the datastore reader runs inside Ray actors."""
    vm = make_vm([2 * MiB, MiB])
    rng = random.Random(7)
    for d in vm.disks:
        scribble(d, rng, [0, MiB - 6000])
    points, _ = backup(cli, repo_path, vcsim, vm, "--all-disks", "--engine", "ray")
    for p, d in zip(points, vm.disks, strict=True):
        assert p["engine"] == "ray"
        assert_restores(repo_path, p["id"], d, tmp_path)


def test_boot_is_sized_from_the_vm(
    cli: CliRunner, repo_path: Path, vcsim: Simulator, make_vm: VmFactory
) -> None:
    """The VM's configuration (64 MiB, 1 CPU; then 2 CPUs, 96 MiB) sizes `comb boot`."""
    vm = make_vm([MiB])
    spec = vim.vm.ConfigSpec(numCPUs=2, memoryMB=96)
    wait(vm.vm.ReconfigVM_Task(spec=spec))
    scribble(vm.disks[0], random.Random(8), [0])
    (p,), _ = backup(cli, repo_path, vcsim, vm)
    res = cli("-r", repo_path, "boot", p["id"], "--print")
    assert res.code == 0, res.err
    assert " -smp 2 -m 96 " in res.out and "<vcpu>2</vcpu>" in res.out
    assert "<memory unit='MiB'>96</memory>" in res.out
    res = cli("-r", repo_path, "boot", p["id"], "--print", "--memory", "128", "--cpus", "1")
    assert " -smp 1 -m 128 " in res.out
