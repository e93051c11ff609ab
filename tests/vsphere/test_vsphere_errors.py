"""vSphere backup failures: one line each, a non-zero exit, no recovery point, no snapshot left."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest
from combtest import CliRunner, MiB, assert_one_line_error, point_ids
from vcsimtest import Simulator, VmFactory, VmInfo, snapshots, wait

from pipeline.jobs.vsphere import SNAPSHOT_NOTE

SOURCE_ERROR = 5
USAGE_ERROR = 2
STAGE_ERROR = 8  # a failure inside the pipeline's reader (with the extent it was reading)


@pytest.fixture(autouse=True)
def _password(vcsim: Simulator, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMB_VSPHERE_PASSWORD", vcsim.password)


def url(sim: Simulator, path: str, user: str | None = None, port: int | None = None) -> str:
    return f"vsphere://{user or sim.username}@{sim.host}:{port or sim.port}/{path}"


def run(cli: CliRunner, repo: Path, sim: Simulator, vm: VmInfo | str, *args: object):  # type: ignore[no-untyped-def]
    path = vm if isinstance(vm, str) else vm.inventory_path
    return cli("-r", repo, "backup", url(sim, path), "--ca-file", sim.cafile, *args)


def test_bad_credentials(
    cli: CliRunner, repo_path: Path, vcsim: Simulator, make_vm: VmFactory, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    vm = make_vm([MiB])
    monkeypatch.setenv("COMB_VSPHERE_PASSWORD", "wrong")
    res = run(cli, repo_path, vcsim, vm)
    assert_one_line_error(res, "login refused", "bad credentials", code=SOURCE_ERROR)


def test_no_password(cli: CliRunner, repo_path: Path, vcsim: Simulator, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.delenv("COMB_VSPHERE_PASSWORD")
    res = run(cli, repo_path, vcsim, "DC0/vm/x")
    assert_one_line_error(res, "COMB_VSPHERE_PASSWORD", code=USAGE_ERROR)


def test_vm_not_found(cli: CliRunner, repo_path: Path, vcsim: Simulator) -> None:
    res = run(cli, repo_path, vcsim, "DC0/vm/no-such-vm")
    assert_one_line_error(res, "no VM at DC0/vm/no-such-vm", code=SOURCE_ERROR)
    res = run(cli, repo_path, vcsim, "DC0/host/DC0_H0")
    assert_one_line_error(res, "not a virtual machine", code=SOURCE_ERROR)


def test_cbt_unsupported(
    cli: CliRunner, repo_path: Path, vcsim: Simulator, make_vm: VmFactory
) -> None:
    vm = make_vm([MiB], hw_version="vmx-04")
    res = run(cli, repo_path, vcsim, vm)
    assert_one_line_error(
        res, "does not support Changed Block Tracking", "vmx-04", code=SOURCE_ERROR
    )


def test_snapshot_failure(
    cli: CliRunner, repo_path: Path, vcsim: Simulator, make_vm: VmFactory
) -> None:
    vm = make_vm([MiB], cbt=True)
    vcsim.fail_next_snapshot(
        vm,
        msg="An error occurred while quiescing the virtual machine",
        fault="ApplicationQuiesceFault",
    )
    res = run(cli, repo_path, vcsim, vm, "--quiesce")
    assert_one_line_error(
        res, "cannot snapshot VM", "error occurred while quiescing", code=SOURCE_ERROR
    )
    assert point_ids(cli, repo_path) == []


@pytest.mark.parametrize("mode", ["error", "truncate"])
def test_datastore_read_failure_removes_the_snapshot(
    cli: CliRunner, repo_path: Path, vcsim: Simulator, make_vm: VmFactory, mode: str
) -> None:
    vm = make_vm([4 * MiB], cbt=True)
    disk = vm.disks[0]
    disk.write(0, b"x" * (4 * MiB))
    vcsim.fail_folder(disk.folder_path, 2 * MiB, mode=mode, count=0)
    res = run(cli, repo_path, vcsim, vm)
    line = assert_one_line_error(res, f"disk {disk.key}", "at offset", code=STAGE_ERROR)
    offset = int(line.split("at offset ")[1].split(":")[0])
    if mode == "truncate":
        assert offset == 2 * MiB and "ended the transfer early" in line
    else:
        assert offset <= 2 * MiB < offset + 4 * MiB and "HTTP 500" in line
    assert point_ids(cli, repo_path) == []
    assert snapshots(vcsim.connect(), vm) == []


def test_tls_certificate_is_checked(
    cli: CliRunner, repo_path: Path, vcsim: Simulator, make_vm: VmFactory
) -> None:
    vm = make_vm([MiB])
    res = cli("-r", repo_path, "backup", url(vcsim, vm.inventory_path))
    assert_one_line_error(res, "not trusted", "--ca-file", "--insecure", code=SOURCE_ERROR)
    res = cli("-r", repo_path, "backup", url(vcsim, vm.inventory_path), "--insecure")
    assert res.code == 0, res.err
    assert len(point_ids(cli, repo_path)) == 1


def test_unreachable_server(cli: CliRunner, repo_path: Path, vcsim: Simulator) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res = cli("-r", repo_path, "backup", url(vcsim, "DC0/vm/x", port=port), "--insecure")
    assert_one_line_error(res, "cannot connect to vSphere", code=SOURCE_ERROR)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["vsphere://host/DC0/vm/x"], "USER@HOST"),
        (["vsphere://u@host/DC0"], "inventory path"),
        (["disk.img", "--quiesce"], "--quiesce applies to vsphere:// sources only"),
        (["vsphere://u@h/DC0/vm/x", "--insecure", "--ca-file", "f"], "not both"),
        (["vsphere://u@h/DC0/vm/x", "--cbt-audit", "101"], "--cbt-audit"),
        (["vsphere://u@h/DC0/vm/x", "--source-name", "n"], "--source-name"),
    ],
)
def test_usage_errors(cli: CliRunner, repo_path: Path, args: list[str], needle: str) -> None:
    res = cli("-r", repo_path, "backup", *args)
    assert_one_line_error(res, needle, code=USAGE_ERROR)


def test_unknown_disk_key(
    cli: CliRunner, repo_path: Path, vcsim: Simulator, make_vm: VmFactory
) -> None:
    vm = make_vm([MiB])
    res = run(cli, repo_path, vcsim, vm, "--disk", "4242")
    assert_one_line_error(res, "no disk 4242", str(vm.disks[0].key), code=USAGE_ERROR)
    assert snapshots(vcsim.connect(), vm) == []


def _snap(vm: VmInfo, name: str, description: str) -> None:
    wait(vm.vm.CreateSnapshot_Task(name=name, description=description, memory=False, quiesce=False))


def test_snapshot_left_by_a_killed_backup_is_removed(
    cli: CliRunner, repo_path: Path, vcsim: Simulator, make_vm: VmFactory
) -> None:
    vm = make_vm([MiB], cbt=True)
    dead = subprocess.Popen(["true"])
    dead.wait()
    host = socket.gethostname()
    _snap(vm, "comb-20260101T000000.000000Z", f"{SNAPSHOT_NOTE} (host {host}, pid {dead.pid})")
    _snap(vm, "nightly", "the user's own snapshot: never touched")
    res = run(cli, repo_path, vcsim, vm)
    assert res.code == 0, res.err
    assert "removed snapshot comb-20260101T000000.000000Z" in res.err
    assert snapshots(vcsim.connect(), vm) == ["nightly"]


def test_snapshot_of_a_running_backup_is_left_alone(
    cli: CliRunner, repo_path: Path, vcsim: Simulator, make_vm: VmFactory
) -> None:
    vm = make_vm([MiB], cbt=True)
    note = f"{SNAPSHOT_NOTE} (host {socket.gethostname()}, pid {os.getpid()})"
    _snap(vm, "comb-running", note)
    res = run(cli, repo_path, vcsim, vm)
    assert_one_line_error(res, "comb-running", "running on host", code=SOURCE_ERROR)
    assert snapshots(vcsim.connect(), vm) == ["comb-running"]
    assert point_ids(cli, repo_path) == []
