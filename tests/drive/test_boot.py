"""``comb boot``: a hand-assembled boot sector, backed up, boots in QEMU (TCG) from the point's
overlay over NBD, prints to COM1 and writes a sector through the BIOS; the write lands in the
overlay, never in the point, and a second boot of the same overlay sees it. ``--print`` gives a
QEMU command and a libvirt domain; errors are one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from combtest import (
    TEST_PASSWORD,
    CliResult,
    Image,
    MiB,
    api_backup,
    assert_one_line_error,
    need_tool,
)
from s3server import S3Server

from catalog.repo import Repository
from catalog.store.points import RecoveryPoint
from drive.nbd.exports import ServedPoint
from drive.nbd.overlay import ServedOverlay
from drive.overlays.overlay import Overlay

ROOT = Path(__file__).resolve().parents[2]
SECTOR = 512
LBA = 10  # the sector the guest writes: CHS 0/0/11 under SeaBIOS's 16-head, 63-sector geometry
MARKER = b"GUEST-WROTE-THIS"
ORIGIN = 0x7C00  # where the BIOS loads the boot sector
DATA = 0x100  # the strings' offset inside the sector


class Asm:
    """Enough of an assembler for one boot sector: bytes, labels, rel8/rel16 fix-ups."""

    def __init__(self) -> None:
        self.code = bytearray()
        self.labels: dict[str, int] = {}
        self.fixups: list[tuple[int, str, int]] = []  # (position, label, size)

    def emit(self, raw: bytes) -> None:
        self.code += raw

    def label(self, name: str) -> None:
        self.labels[name] = len(self.code)

    def rel(self, opcode: bytes, name: str, size: int) -> None:
        """A jump or call: ``opcode`` then a displacement of ``size`` bytes to ``name``."""
        self.code += opcode
        self.fixups.append((len(self.code), name, size))
        self.code += bytes(size)

    def image(self, strings: dict[str, bytes]) -> bytes:
        sector = bytearray(SECTOR)
        assert len(self.code) <= DATA
        sector[: len(self.code)] = self.code
        for pos, name, size in self.fixups:
            delta = self.labels[name] - (pos + size)
            sector[pos : pos + size] = delta.to_bytes(size, "little", signed=True)
        sector[510:512] = b"\x55\xaa"  # the boot signature
        return bytes(sector)


STRINGS = {  # offset inside the sector -> NUL-terminated text
    "ok": (DATA, b"COMB-BOOT-OK\r\n\0"),
    "seen": (DATA + 0x20, b"SAW-EARLIER-WRITE\r\n\0"),
    "done": (DATA + 0x40, b"WRITE-DONE\r\n\0"),
    "fail": (DATA + 0x60, b"DISK-ERROR\r\n\0"),
    "marker": (DATA + 0x80, MARKER),
}


def addr(name: str) -> bytes:
    """The 16-bit address (segment 0) of a string, little-endian."""
    return (ORIGIN + STRINGS[name][0]).to_bytes(2, "little")


def chs_io(a: Asm, ah: int) -> None:
    """int 13h function ``ah`` on one sector at CHS 0/0/11 of drive 0x80, buffer 0:8000h."""
    a.emit(bytes([0xB8, 0x01, ah]))  # mov ax, ah<<8|1   ; AH = function, AL = 1 sector
    a.emit(b"\xb9\x0b\x00")  # mov cx, 0x000B            ; CH = cylinder 0, CL = sector 11
    a.emit(b"\xba\x80\x00")  # mov dx, 0x0080            ; DH = head 0, DL = first hard disk
    a.emit(b"\xbb\x00\x80")  # mov bx, 0x8000            ; ES:BX = 0000:8000 (the buffer)
    a.emit(b"\xcd\x13")  # int 0x13                      ; BIOS disk service
    a.rel(b"\x72", "fail", 1)  # jc fail                 ; carry set: the BIOS reports an error


def boot_sector() -> bytes:
    a = Asm()
    a.emit(b"\xfa")  # cli                     ; no interrupts while the stack moves
    a.emit(b"\x31\xc0")  # xor ax, ax          ; AX = 0
    a.emit(b"\x8e\xd8")  # mov ds, ax          ; DS = 0 (strings at 0:7Cxx)
    a.emit(b"\x8e\xc0")  # mov es, ax          ; ES = 0 (buffers at 0:8000)
    a.emit(b"\x8e\xd0")  # mov ss, ax          ; SS = 0
    a.emit(b"\xbc\x00\x7c")  # mov sp, 0x7C00  ; the stack grows down below the boot sector
    a.emit(b"\xfb")  # sti                     ; interrupts back on (the BIOS needs them)
    a.emit(b"\xfc")  # cld                     ; string instructions count upwards
    a.emit(b"\xbe" + addr("ok"))  # mov si, msg_ok
    a.rel(b"\xe8", "print", 2)  # call print   ; "COMB-BOOT-OK"
    chs_io(a, 0x02)  # read LBA 10 into 0:8000
    a.emit(b"\x80\x3e\x00\x80" + MARKER[:1])  # cmp byte [0x8000], 'G' ; written before?
    a.rel(b"\x75", "fresh", 1)  # jne fresh    ; no: nothing to report
    a.emit(b"\xbe" + addr("seen"))  # mov si, msg_seen
    a.rel(b"\xe8", "print", 2)  # call print   ; "SAW-EARLIER-WRITE"
    a.label("fresh")
    a.emit(b"\xbf\x00\x80")  # mov di, 0x8000  ; ES:DI = the buffer
    a.emit(b"\xb9\x00\x02")  # mov cx, 512     ; a whole sector
    a.emit(b"\x31\xc0")  # xor ax, ax          ; AL = 0
    a.emit(b"\xf3\xaa")  # rep stosb           ; zero the buffer
    a.emit(b"\xbe" + addr("marker"))  # mov si, marker
    a.emit(b"\xbf\x00\x80")  # mov di, 0x8000  ; the buffer again
    a.emit(bytes([0xB9, len(MARKER), 0]))  # mov cx, len(MARKER)
    a.emit(b"\xf3\xa4")  # rep movsb           ; the marker at the buffer's start
    chs_io(a, 0x03)  # write the buffer to LBA 10
    a.emit(b"\xbe" + addr("done"))  # mov si, msg_done
    a.rel(b"\xe8", "print", 2)  # call print   ; "WRITE-DONE"
    a.label("off")
    a.emit(b"\xb8\x00\x20")  # mov ax, 0x2000  ; SLP_EN with sleep type 0: soft power off
    a.emit(b"\xba\x04\x06")  # mov dx, 0x604   ; PIIX4 PM1a control (SeaBIOS's PM base 0x600)
    a.emit(b"\xef")  # out dx, ax              ; QEMU powers off and exits with status 0
    a.label("hang")
    a.emit(b"\xf4")  # hlt                     ; not reached
    a.rel(b"\xeb", "hang", 1)  # jmp hang
    a.label("fail")
    a.emit(b"\xbe" + addr("fail"))  # mov si, msg_fail
    a.rel(b"\xe8", "print", 2)  # call print   ; "DISK-ERROR"
    a.rel(b"\xeb", "off", 1)  # jmp off        ; power off all the same
    a.label("print")  # print the NUL-terminated string at DS:SI on COM1
    a.emit(b"\xba\xf8\x03")  # mov dx, 0x3F8   ; COM1's data port
    a.label("next")
    a.emit(b"\xac")  # lodsb                   ; AL = [DS:SI], SI += 1
    a.emit(b"\x84\xc0")  # test al, al         ; the terminating NUL?
    a.rel(b"\x74", "ret", 1)  # jz ret
    a.emit(b"\xee")  # out dx, al              ; send the character
    a.rel(b"\xeb", "next", 1)  # jmp next
    a.label("ret")
    a.emit(b"\xc3")  # ret
    sector = bytearray(a.image({}))
    for offset, text in STRINGS.values():
        sector[offset : offset + len(text)] = text
    return bytes(sector)


@pytest.fixture
def bootable(tmp_path: Path) -> tuple[Path, RecoveryPoint]:
    img = Image(tmp_path / "disk.img", 4 * MiB)  # sparse, a few MiB
    img.write(0, boot_sector())
    repo = Repository.init(str(tmp_path / "repo"), 64 * 1024, 3, password=TEST_PASSWORD)
    return tmp_path / "repo", api_backup(repo.location, img.path, name="bootdisk")


def comb(repo: Path | str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "pipeline.cli", "-r", str(repo), *args]
    return subprocess.run(
        cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, cwd=ROOT, env=env,
        timeout=timeout,
    )  # fmt: skip


def sector_of_overlay(repo: Path | str, name: str, point: RecoveryPoint) -> bytes:
    r = Repository.open(str(repo), password=TEST_PASSWORD)
    opened = Overlay(r, name)
    try:
        base = ServedPoint(r.reader(point))
        return ServedOverlay(opened, base, point.chunk_size).read(LBA * SECTOR, SECTOR)
    finally:
        opened.close()


def sector_of_point(repo: Path | str, point: RecoveryPoint) -> bytes:
    return (
        Repository.open(str(repo), password=TEST_PASSWORD).reader(point).read(LBA * SECTOR, SECTOR)
    )


def test_boot_writes_to_overlay_only_and_persists(bootable: tuple[Path, RecoveryPoint]) -> None:
    boots_twice(*bootable)


def test_boot_from_an_s3_repository(tmp_path: Path, s3_env: S3Server) -> None:
    """The overlay's log and lock are objects in the bucket (``catalog.store.s3_inplace``)."""
    img = Image(tmp_path / "disk.img", 4 * MiB)
    img.write(0, boot_sector())
    url = f"s3://{s3_env.bucket()}/repo"
    repo = Repository.init(url, 64 * 1024, 3, password=TEST_PASSWORD)
    boots_twice(url, api_backup(repo.location, img.path, name="bootdisk"))
    keys = s3_env.client().list_objects_v2(Bucket=url.split("/")[2], Prefix="repo/overlays/t1/")
    names = {o["Key"].split("/", 3)[3] for o in keys["Contents"]}
    assert {"overlay.json", "log-0.dat", "log-1.dat"} <= names, names  # a new log per open
    lock = s3_env.client().get_object(Bucket=url.split("/")[2], Key="repo/overlays/t1/lock")
    assert json.loads(lock["Body"].read())["released"]


def boots_twice(repo: Path | str, point: RecoveryPoint) -> None:
    need_tool("qemu-system-x86_64")
    started = time.monotonic()
    first = comb(repo, "boot", point.id, "--name", "t1")
    took = time.monotonic() - started
    assert first.returncode == 0, (first.stdout, first.stderr)
    assert "COMB-BOOT-OK" in first.stdout and "WRITE-DONE" in first.stdout, first.stdout
    assert "SAW-EARLIER-WRITE" not in first.stdout and "DISK-ERROR" not in first.stdout
    assert "overlay t1" in first.stderr and took < 25
    expected = MARKER + bytes(SECTOR - len(MARKER))
    assert sector_of_overlay(repo, "t1", point) == expected
    assert sector_of_point(repo, point) == bytes(SECTOR)  # the point is never written

    second = comb(repo, "boot", f"bootdisk@{point.id[:6]}", "--name", "t1")
    assert second.returncode == 0, (second.stdout, second.stderr)
    assert "SAW-EARLIER-WRITE" in second.stdout and "WRITE-DONE" in second.stdout
    assert sector_of_overlay(repo, "t1", point) == expected
    assert sector_of_point(repo, point) == bytes(SECTOR)


def test_boot_default_name(bootable: tuple[Path, RecoveryPoint]) -> None:
    need_tool("qemu-system-x86_64")
    repo, point = bootable
    res = comb(repo, "boot", "bootdisk@latest", "--memory", "64")
    assert res.returncode == 0 and "WRITE-DONE" in res.stdout, (res.stdout, res.stderr)
    name = f"boot-{point.id[:8]}"
    assert f"overlay {name}" in res.stderr
    assert sector_of_overlay(repo, name, point).startswith(MARKER)


def test_print_gives_qemu_command_and_libvirt_xml(bootable: tuple[Path, RecoveryPoint]) -> None:
    repo, point = bootable
    res = comb(repo, "boot", point.id, "--name", "p1", "--print", "--memory", "256")
    assert res.returncode == 0, res.stderr
    uri = "nbd://127.0.0.1:10809/overlay/p1"
    qemu = [ln for ln in res.stdout.splitlines() if "qemu-system-x86_64" in ln]
    assert len(qemu) == 1 and uri in qemu[0] and "-m 256" in qemu[0], res.stdout
    assert "-serial stdio" in qemu[0] and "-display none" in qemu[0]
    assert f"serve --listen 127.0.0.1:10809 --overlay p1={point.id}" in res.stdout
    domain = ET.fromstring(res.stdout[res.stdout.index("<domain") :])
    source = domain.find("./devices/disk[@type='network']/source")
    assert source is not None and source.get("protocol") == "nbd"
    assert source.get("name") == "overlay/p1"
    host = source.find("host")
    assert host is not None and host.get("port") == "10809" and host.get("name") == "127.0.0.1"
    driver = domain.find("./devices/disk/driver")
    assert driver is not None and driver.get("type") == "raw"
    assert not (repo / "overlays" / "p1").exists()  # --print starts and creates nothing


def test_print_shows_the_chosen_accelerator(bootable: tuple[Path, RecoveryPoint]) -> None:
    repo, point = bootable
    for flag, want, kind in (("tcg", "-accel tcg", "qemu"), ("kvm", "-accel kvm -cpu max", "kvm")):
        res = comb(repo, "boot", point.id, "--print", "--accel", flag)
        assert res.returncode == 0, res.stderr
        assert want in res.stdout and f"<domain type='{kind}'>" in res.stdout
        assert f"comb: accelerator {flag}" in res.stderr


def test_boot_errors(bootable: tuple[Path, RecoveryPoint], tmp_path: Path) -> None:
    repo, point = bootable
    for args, needle, code in [
        (["ffffffffffff"], "ffffffffffff", 4),
        ([point.id, "--name", ".bad"], "invalid", 2),
        ([point.id, "--memory", "0"], "--memory", 2),
    ]:
        res = comb(repo, "boot", *args)
        assert_one_line_error(CliResult(res.returncode, res.stdout, res.stderr), needle, code=code)
    env_path = str(tmp_path / "empty-bin")
    os.makedirs(env_path)
    cmd = [sys.executable, "-m", "pipeline.cli", "-r", str(repo), "boot", point.id]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PATH": env_path}
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=30)
    assert res.returncode == 1 and res.stderr.count("\n") == 1, res.stderr
    assert "qemu-system-x86_64 is not installed" in res.stderr


@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 0), (signal.SIGINT, 130)])
def test_a_signal_stops_qemu_and_server(tmp_path: Path, signum: int, code: int) -> None:
    """SIGTERM stops QEMU and the server (QEMU's exit code: 0); Ctrl-C too, exit 130 as serve
    and mount."""
    need_tool("qemu-system-x86_64")
    img = Image(tmp_path / "blank.img", 2 * MiB)  # no boot signature: SeaBIOS retries forever
    repo = Repository.init(str(tmp_path / "repo"), 64 * 1024, 3, password=TEST_PASSWORD)
    point = api_backup(repo.location, img.path, name="blank")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "pipeline.cli", "-r", repo.location, "boot", point.id]
    proc = subprocess.Popen(
        [*cmd, "--name", "b1"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env,
    )  # fmt: skip
    assert proc.stderr is not None
    assert "comb: accelerator" in proc.stderr.readline()  # chosen first (auto: probed once)
    assert "overlay b1" in proc.stderr.readline()  # the server is up and QEMU is starting
    time.sleep(1.0)
    assert proc.poll() is None  # still booting, nothing to boot from
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=20)
    assert "Traceback" not in err and proc.returncode == code, (proc.returncode, err)
    r = Repository.open(repo.location, password=TEST_PASSWORD)
    Overlay(r, "b1").close()  # the lock was released: the server and QEMU are gone
    assert sector_of_point(Path(repo.location), point) == bytes(SECTOR)


def test_base_point_is_loaded_on_first_read_only(bootable: tuple[Path, RecoveryPoint]) -> None:
    from pipeline.cli.boot_cmd import _LazyBase

    class Sources:
        def __init__(self) -> None:
            self.calls = 0

        def get(self, point: RecoveryPoint) -> ServedPoint:
            self.calls += 1
            raise RuntimeError("loaded")

    sources = Sources()
    point = bootable[1]
    lazy = _LazyBase(sources, point)  # type: ignore[arg-type]
    assert lazy.size == 4 * MiB and sources.calls == 0  # serving starts without the manifest
    with pytest.raises(RuntimeError):
        lazy.read(0, SECTOR)
    assert sources.calls == 1
