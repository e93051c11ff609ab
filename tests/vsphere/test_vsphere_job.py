"""vSphere VMs in a job file (``pipeline.jobs.jobfile``): a ``vsphere://`` source backs up the
VM's disks through one snapshot in the job's round, beside image files, then by CBT; it is due
when one of its disks is; its keep rules forget per disk; its own options (``all_disks``,
``ca_file``, ...) are checked like the others, with the key's line."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
from combtest import CliRunner, ImageFactory, MiB, api_restore, cmp_files
from vcsimtest import Simulator, VmFactory, snapshots


@pytest.fixture(autouse=True)
def _password(vcsim: Simulator, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMB_VSPHERE_PASSWORD", vcsim.password)


def test_a_vm_in_a_job_file_is_backed_up_with_the_images(
    cli: CliRunner, repo_path: Path, vcsim: Simulator, make_vm: VmFactory,
    make_image: ImageFactory, tmp_path: Path,
) -> None:  # fmt: skip
    vm = make_vm([3 * MiB, 2 * MiB])
    rng = random.Random(4)
    for disk in vm.disks:
        disk.write(MiB, rng.randbytes(5000))
    make_image(MiB, "a.img").random(0, MiB, seed=1)
    url = f"vsphere://{vcsim.username}@{vcsim.host}:{vcsim.port}/{vm.inventory_path}"
    job = tmp_path / "jobs.toml"
    job.write_text(
        '[defaults]\nevery = "1s"\nkeep = { last = 1 }\n'
        '[[source]]\npath = "a.img"\n'
        f'[[source]]\npath = "{url}"\nall_disks = true\nca_file = "{vcsim.cafile}"\n'
    )
    res = cli("-r", repo_path, "job", "run", job, "--json")
    assert res.code == 0, res.err
    name = f"vsphere://{vcsim.host}:{vcsim.port}/{vm.inventory_path}"
    rows = {d["source"]: d for d in json.loads(res.out)["sources"]}
    first = rows[name]
    assert first["status"] == "backed up" and len(first["points"]) == 2
    assert rows[str(tmp_path / "a.img")]["status"] == "backed up"
    assert snapshots(vcsim.connect(), vm) == []
    # Again: by CBT, only what changed; the keep rule forgets each disk's older point.
    vm.disks[1].write(0, rng.randbytes(5000))
    res = cli("-r", repo_path, "job", "run", job, "--json")
    assert res.code == 0, res.err
    second = {d["source"]: d for d in json.loads(res.out)["sources"]}[name]
    assert sorted(second["forgotten"]) == sorted(first["points"])
    points = json.loads(cli("-r", repo_path, "points", "--json").out)["points"]
    disks = sorted((p for p in points if p["source"].startswith(name)), key=lambda p: p["source"])
    assert {p["id"] for p in disks} == set(second["points"])  # (the first ones forgotten)
    assert all(p["mode"] == "changed-extents" for p in disks)
    for p, disk in zip(disks, sorted(vm.disks, key=lambda d: f"disk-{d.key}"), strict=True):
        out = tmp_path / f"{p['id']}.img"
        api_restore(repo_path, p["id"], out)
        cmp_files(out, disk.flat_path)
    st = json.loads(cli("-r", repo_path, "job", "status", job, "--json").out)
    vm_row = next(r for r in st["sources"] if r["source"] == name)
    assert vm_row["last_point"] in second["points"] and vm_row["last_run_status"] == "backed up"


@pytest.mark.parametrize(
    ("extra", "needle"),
    [('name = "x"', "line 3: `source.name` does not apply to a vsphere:// source"),
     ('node = "n1"', "line 3: `source.node` does not apply to a vsphere:// source"),
     ("all_disks = 1", "line 3: `source.all_disks` has the wrong type"),
     ('disks = ["a"]', "line 3: `source.disks` must be a list of disk keys")],
)  # fmt: skip
def test_a_vm_sources_options_are_checked(
    cli: CliRunner, repo_path: Path, tmp_path: Path, extra: str, needle: str
) -> None:
    job = tmp_path / "jobs.toml"
    job.write_text(f'[[source]]\npath = "vsphere://u@vc.example/DC/vm/web"\n{extra}\n')
    res = cli("-r", repo_path, "job", "status", job)
    assert res.code == 2 and needle in res.err, res.err
    job.write_text('[[source]]\npath = "a.img"\nquiesce = true\n')
    res = cli("-r", repo_path, "job", "status", job)
    assert res.code == 2 and "`source.quiesce` applies to vsphere:// sources only" in res.err


def test_a_glob_of_vms_backs_up_each_vm_it_finds(
    cli: CliRunner, repo_path: Path, vcsim: Simulator, make_vm: VmFactory, tmp_path: Path
) -> None:
    vms = [make_vm([MiB]) for _ in range(2)]
    for vm in vms:
        vm.disks[0].write(0, random.Random(vm.name).randbytes(5000))
    folder, _ = vms[0].inventory_path.rsplit("/", 1)
    prefix = os.path.commonprefix([vm.name for vm in vms])
    host = f"{vcsim.username}@{vcsim.host}:{vcsim.port}"
    job = tmp_path / "jobs.toml"
    job.write_text(
        f'[[source]]\npath = "vsphere://{host}/{folder}/{prefix}*"\nca_file = "{vcsim.cafile}"\n'
        f'[[source]]\npath = "vsphere://{host}/{folder}/none-such-*"\nca_file = "{vcsim.cafile}"\n'
    )
    res = cli("-r", repo_path, "job", "run", job, "--json")
    assert res.code == 5
    rows = {d["source"]: d for d in json.loads(res.out)["sources"]}
    server = f"vsphere://{vcsim.host}:{vcsim.port}"
    for vm in vms:
        assert rows[f"{server}/{vm.inventory_path}"]["status"] == "backed up"
    missing = rows[f"{server}/{folder}/none-such-*"]
    assert missing["status"] == "failed" and missing["error"].startswith("no VM matches")
    assert all(snapshots(vcsim.connect(), vm) == [] for vm in vms)
    # Only the glob that matches, with an `every`: each VM is scheduled on its own.
    job.write_text(
        f'[defaults]\nevery = "1h"\n[[source]]\npath = "vsphere://{host}/{folder}/{prefix}*"\n'
        f'ca_file = "{vcsim.cafile}"\n'
    )
    res = cli("-r", repo_path, "job", "run", job, "--json")
    assert res.code == 0, res.err
    assert {d["status"] for d in json.loads(res.out)["sources"]} == {"not due"}
    res = cli("-r", repo_path, "report", "rpo", "--job", job, "--json")
    report = {r["source"]: r["rpo"] for r in json.loads(res.out)["rows"]}
    for vm in vms:  # (by each disk, as the points name them)
        assert report[f"{server}/{vm.inventory_path}/disk-{vm.disks[0].key}"] == "kept"
