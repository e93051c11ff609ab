"""A real vSphere endpoint for tests and benchmarks: govmomi's vcsim plus comb's CBT extension.

Standalone (stdlib, pyvmomi and requests only), so a benchmark can import it by path.
The simulator is built from Debian's govmomi source by tests/vcsim/build.sh; see
tests/vcsim/README.md for what it models and the fault hooks.

    with Simulator(workdir, cbt_page_bytes=1 << 20) as sim:
        si = sim.connect()
        vm = create_vm(si, "web", [64 << 20], cbt=True)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import requests
from pyVim.connect import Disconnect, SmartConnect
from pyVim.task import WaitForTask
from pyVmomi import vim

REPO = Path(__file__).resolve().parent.parent
BUILD_SH = REPO / "tests" / "vcsim" / "build.sh"
GOVMOMI = Path("/usr/share/gocode/src/github.com/vmware/govmomi/simulator")
DATACENTER = "DC0"
DATASTORE = "LocalDS_0"
HOST = "DC0/host/DC0_H0"  # the standalone host of the VPX model
# The QueryChangedDiskAreas page of the tests' simulator (tests/conftest.py): small, so
# that clients always have to follow the answers' paging.
CBT_PAGE_BYTES = 1 << 20


def missing_go() -> str | None:
    """Why the simulator cannot be built here, or None."""
    if shutil.which("go") is None:
        return "go is not installed (Debian: golang-go)"
    if not (GOVMOMI / "simulator.go").is_file():
        return "govmomi source is not installed (Debian: golang-github-vmware-govmomi-dev)"
    return None


def need_go() -> None:
    """In a test: skip when go or govmomi is missing, but fail in CI (CI=true)."""
    import pytest

    reason = missing_go()
    if reason is not None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"vcsim is required in CI: {reason}")
        pytest.skip(reason)


def build(outdir: str | Path | None = None) -> str:
    """Build (or reuse, when up to date) the simulator; returns the binary's path."""
    out = Path(outdir) if outdir is not None else REPO / ".cache" / "vcsim"
    proc = subprocess.run(
        ["sh", str(BUILD_SH), str(out)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"vcsim build failed: {(proc.stderr or proc.stdout).strip()}")
    return str(out / "vcsim")


@dataclass(frozen=True)
class DiskInfo:
    key: int  # device key (QueryChangedDiskAreas deviceKey)
    capacity: int  # bytes
    file_name: str  # backing.fileName, "[LocalDS_0] NAME/NAME.vmdk"
    folder_path: str  # datastore-relative path of the flat file, for /folder URLs
    flat_path: Path  # the flat file on the local file system (the disk's bytes)

    def write(self, offset: int, data: bytes) -> None:
        """Write guest data into the disk (do not do it while a backup reads the disk)."""
        with open(self.flat_path, "r+b") as fh:
            fh.seek(offset)
            fh.write(data)

    def read(self, offset: int = 0, length: int | None = None) -> bytes:
        with open(self.flat_path, "rb") as fh:
            fh.seek(offset)
            return fh.read(self.capacity - offset if length is None else length)


@dataclass(frozen=True)
class VmInfo:
    name: str
    inventory_path: str  # for SearchIndex.FindByInventoryPath, "DC0/vm/NAME"
    moref: str  # "vm-57"
    vm: Any = field(
        repr=False
    )  # vim.VirtualMachine (Any: pyvmomi's stubs make every property Optional)
    disks: list[DiskInfo]


VmFactory = Callable[..., VmInfo]  # the make_vm fixture: (disk_sizes, **create_vm kwargs)


class Simulator:
    """A vcsim process (VPX model: DC0, DC0_H0, LocalDS_0, ...) with TLS and a login.

    Data (datastore directories, certificate, log) lives under ``workdir``; ``TMPDIR`` of
    the process points there so that SIGTERM's clean-up stays inside it.
    """

    def __init__(
        self,
        workdir: str | Path,
        *,
        binary: str | None = None,
        username: str = "backup",
        password: str = "s3cret!",
        cbt_page_bytes: int = 0,
        trace: bool = False,
    ) -> None:
        self.workdir = Path(workdir)
        self.binary = binary
        self.username = username
        self.password = password
        self.cbt_page_bytes = cbt_page_bytes
        self.trace = trace
        self.cafile = str(self.workdir / "vcsim.crt")
        self.host = "127.0.0.1"
        self.port = 0
        self.url = ""  # https://127.0.0.1:PORT/sdk
        self.log = self.workdir / "vcsim.log"
        self._proc: subprocess.Popen[bytes] | None = None

    # -- process ---------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> Simulator:
        binary = self.binary or build()
        self.workdir.mkdir(parents=True, exist_ok=True)
        tmp = self.workdir / "tmp"
        tmp.mkdir(exist_ok=True)
        key = self.workdir / "vcsim.key"
        if not key.exists():
            subprocess.run(
                ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "30"]
                + ["-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"]
                + ["-keyout", str(key), "-out", self.cafile],
                check=True,
                capture_output=True,
            )
        cmd = [binary, "-l", f"{self.host}:0", "-username", self.username]
        cmd += ["-password", self.password, "-tlscert", self.cafile, "-tlskey", str(key)]
        cmd += ["-cbt-page-bytes", str(self.cbt_page_bytes)] + (["-trace"] if self.trace else [])
        with open(self.log, "ab") as log:
            self._proc = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=log, env={**os.environ, "TMPDIR": str(tmp)}
            )
        assert self._proc.stdout is not None
        line: list[bytes] = []
        reader = threading.Thread(target=lambda: line.append(self._proc.stdout.readline()))  # type: ignore[union-attr]
        reader.start()
        reader.join(timeout)
        if not line or not line[0]:
            self.stop()
            raise RuntimeError(
                f"vcsim did not start: {self.log.read_text(errors='replace')[-2000:]}"
            )
        ready = json.loads(line[0])
        self.port = int(ready["port"])
        self.url = f"https://{self.host}:{self.port}/sdk"
        return self

    def stop(self) -> None:
        """SIGTERM (the simulator removes its datastore directories) and wait."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()

    def __enter__(self) -> Simulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- clients ---------------------------------------------------------------------------

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.cafile)

    def connect(self, password: str | None = None) -> vim.ServiceInstance:
        """A pyvmomi ServiceInstance, TLS verified against ``cafile``."""
        return SmartConnect(
            host=self.host,
            port=self.port,
            user=self.username,
            pwd=self.password if password is None else password,
            sslContext=self.ssl_context(),
        )

    @staticmethod
    def disconnect(si: vim.ServiceInstance) -> None:
        Disconnect(si)

    def folder_url(self, folder_path: str) -> str:
        """The /folder URL of a datastore-relative path (e.g. ``DiskInfo.folder_path``)."""
        return (
            f"https://{self.host}:{self.port}/folder/{quote(folder_path)}"
            f"?dcPath={DATACENTER}&dsName={DATASTORE}"
        )

    # -- fault hooks (README.md) -----------------------------------------------------------

    def hook(self, name: str, **params: Any) -> None:
        """POST /_comb/NAME?params; raises RuntimeError with the server's reason on refusal."""
        r = requests.post(
            f"https://{self.host}:{self.port}/_comb/{name}",
            params={k: str(v) for k, v in params.items()},
            verify=self.cafile,
            timeout=30,
        )
        if r.status_code != 200:
            raise RuntimeError(f"hook {name}: {r.status_code} {r.text.strip()}")

    def lie_cbt(
        self, vm: VmInfo | str, disk_key: int, start: int, length: int, which: str = "all"
    ) -> None:
        """From now on QueryChangedDiskAreas of that disk leaves out every 64 KiB block
        overlapping [start, start+length); which: "all", "full" ("*") or "incremental"."""
        self.hook("lie-cbt", vm=_moref(vm), disk=disk_key, start=start, length=length, which=which)

    def fail_next_snapshot(
        self, vm: VmInfo | str, msg: str = "injected snapshot failure", fault: str = "SnapshotFault"
    ) -> None:
        """The next CreateSnapshot_Task on the VM fails with vim.fault.<fault> and message msg
        (e.g. fault="ApplicationQuiesceFault" for a quiesce failure)."""
        self.hook("fail-snapshot", vm=_moref(vm), fault=fault, msg=msg)

    def fail_folder(
        self, folder_path: str, offset: int, mode: str = "error", count: int = 1
    ) -> None:
        """The next `count` (0: all) /folder GETs of folder_path whose range reaches `offset`
        fail: mode "error" answers 500, "truncate" cuts the body at that file offset."""
        self.hook("fail-folder", path=folder_path, offset=offset, mode=mode, count=count)

    def clear_hooks(self) -> None:
        self.hook("clear")


def _moref(vm: VmInfo | str | vim.VirtualMachine) -> str:
    if isinstance(vm, VmInfo):
        return vm.moref
    if isinstance(vm, str):
        return vm
    return str(vm._moId)


def session_cookie(si: vim.ServiceInstance) -> dict[str, str]:
    """The SOAP session's cookie, for requests' ``cookies=`` on /folder."""
    m = re.search(r'vmware_soap_session="?([^";]+)"?', si._stub.cookie or "")
    if m is None:
        raise RuntimeError("not logged in")
    return {"vmware_soap_session": m.group(1)}


def wait(task: vim.Task) -> Any:
    """Wait for a task; returns its result, raises its fault."""
    WaitForTask(task)
    return task.info.result


def create_vm(
    si: vim.ServiceInstance,
    name: str,
    disk_sizes: list[int],
    hw_version: str = "vmx-13",
    cbt: bool = False,
    power_on: bool = True,
) -> VmInfo:
    """Create a VM in DC0/vm on DC0_H0 with one thin disk per size (bytes) in LocalDS_0.

    Each disk's flat file is a sparse file of exactly that size (all zeros).
    """
    index: Any = si.RetrieveContent().searchIndex
    dc = index.FindByInventoryPath(DATACENTER)
    compute = index.FindByInventoryPath(HOST)
    if dc is None or compute is None:
        raise RuntimeError("simulator inventory lacks DC0 or DC0_H0")
    scsi = vim.vm.device.VirtualLsiLogicController(key=1000, busNumber=0, sharedBus="noSharing")
    changes = [vim.vm.device.VirtualDeviceSpec(operation="add", device=scsi)]
    for i, size in enumerate(disk_sizes):
        if size <= 0 or size % 512:
            raise ValueError(f"disk size {size} is not a positive multiple of 512")
        disk = vim.vm.device.VirtualDisk(
            key=2000 + i,  # as vSphere numbers them
            controllerKey=scsi.key,
            unitNumber=i if i < 7 else i + 1,  # unit 7 is the SCSI controller's own
            capacityInBytes=size,
            capacityInKB=size // 1024,
            backing=vim.vm.device.VirtualDisk.FlatVer2BackingInfo(
                fileName=f"[{DATASTORE}]", diskMode="persistent", thinProvisioned=True
            ),
        )
        changes.append(
            vim.vm.device.VirtualDeviceSpec(operation="add", fileOperation="create", device=disk)
        )
    spec = vim.vm.ConfigSpec(
        name=name,
        version=hw_version,
        guestId="otherGuest64",
        numCPUs=1,
        memoryMB=64,
        files=vim.vm.FileInfo(vmPathName=f"[{DATASTORE}]"),
        deviceChange=changes,
    )
    if cbt:
        spec.changeTrackingEnabled = True
    vm = wait(dc.vmFolder.CreateVM_Task(config=spec, pool=compute.resourcePool))
    if power_on:
        wait(vm.PowerOnVM_Task())
    return vm_info(vm)


def vm_info(vm: vim.VirtualMachine) -> VmInfo:
    """Describe an existing VM (its disks as the VM sees them now)."""
    disks = []
    config: Any = vm.config
    for dev in config.hardware.device:
        if not isinstance(dev, vim.vm.device.VirtualDisk):
            continue
        backing: Any = dev.backing
        file_name = backing.fileName
        m = re.fullmatch(r"\[([^\]]+)\] ?(.*)", file_name)
        if m is None:
            raise RuntimeError(f"unexpected disk file name {file_name!r}")
        rel = m.group(2)
        if not rel.endswith("-flat.vmdk"):
            rel = rel.replace(".vmdk", "-flat.vmdk", 1)
        url = backing.datastore.info.url
        capacity = dev.capacityInBytes or dev.capacityInKB * 1024
        disks.append(DiskInfo(dev.key, capacity, file_name, rel, Path(url) / rel))
    return VmInfo(vm.name, f"{DATACENTER}/vm/{vm.name}", vm._moId, vm, disks)


def snapshots(si: vim.ServiceInstance, vm: VmInfo | vim.VirtualMachine) -> list[str]:
    """Names of the VM's snapshots (depth first); [] when it has none."""
    obj = vm.vm if isinstance(vm, VmInfo) else vm
    names: list[str] = []

    def walk(trees: list[Any]) -> None:
        for tree in trees:
            names.append(tree.name)
            walk(tree.childSnapshotList)

    if obj.snapshot is not None:
        walk(obj.snapshot.rootSnapshotList)
    return names
