"""``comb boot``: boot a recovery point in QEMU through a writable overlay served over NBD.

Owns the command's side only: the overlay's name (created over the point if missing, reopened
otherwise), an in-process NBD server on a background thread serving that overlay, the QEMU
command line (and, with ``--print``, the same command plus a libvirt domain for the user's own
tools), QEMU's life cycle and exit code, the repository's shared ``boot`` lock for that life
(FORMAT.md 13), and turning SIGINT and SIGTERM into a clean stop. The server is
``drive.nbd.server``; the overlay ``drive.overlays.overlay``.

The base point is loaded lazily: nothing of its manifest is read until QEMU's first read or
block-status request, so starting the server and QEMU does not depend on the disk's size.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from types import FrameType
from xml.sax.saxutils import quoteattr

import psutil

import drive.overlays.overlay as overlay
from catalog.errors import CombError, UsageError
from catalog.repo import Repository
from catalog.store.points import RecoveryPoint
from drive.nbd.exports import ServedPoint, SourceCache
from drive.nbd.overlay import ServedOverlay
from drive.nbd.server import DEFAULT_HOST, DEFAULT_PORT, NbdServer
from drive.nbd.tls import is_loopback

from ..accel import KVM_ARGS, TCG_ARGS, Accel, choose
from ..console import note
from ..locking import reader_lock
from . import EXIT_INTERRUPTED, POINT_HELP, Subparsers, command
from .serve_cmd import close_overlays, parse_listen

QEMU = "qemu-system-x86_64"
DEFAULT_MEMORY_MIB = 512
# A VM's configured memory is capped at this share of the host's (a backed-up 64 GiB VM still
# boots for inspection on a small recovery host).
MAX_HOST_MEMORY_SHARE = 0.5


def add_parser(sub: Subparsers) -> None:
    s = command(
        sub,
        "boot",
        "boot a recovery point in QEMU through a writable overlay, without a restore",
        [
            "comb -r /backup/repo boot web01@latest --name try1",
            "comb -r /backup/repo boot web01@latest --name try1 --print",
        ],
        json=None,
    )
    s.add_argument("point", help=POINT_HELP)
    s.add_argument("--name", help="overlay name (default boot-<first 8 hex of the point id>)")
    s.add_argument("--print", action="store_true", help="print the QEMU and libvirt setup only")
    s.add_argument(
        "--memory",
        type=int,
        default=None,
        metavar="MiB",
        help="guest memory (default: the backed-up VM's, else 512)",
    )
    s.add_argument(
        "--cpus", type=int, default=None, help="guest CPUs (default: the backed-up VM's, else 1)"
    )
    s.add_argument(
        "--listen", metavar="HOST:PORT", help="NBD address, loopback only (default 127.0.0.1:0)"
    )
    s.add_argument(
        "--accel",
        choices=["auto", "kvm", "tcg"],
        default="auto",
        help="QEMU accelerator (default auto: KVM when a probe guest runs well here, else TCG)",
    )
    s.add_argument("--kvm", action="store_true", help="the same as --accel kvm")
    s.set_defaults(run=cmd_boot)


class QemuMissing(CombError):
    """The QEMU binary is not installed."""

    exit_code = 1


class _LazyBase:
    """The overlay's base point, loaded (through the server's shared cache) on first use."""

    def __init__(self, sources: SourceCache, point: RecoveryPoint) -> None:
        self._sources = sources
        self._point = point
        self.size = point.size

    def _served(self) -> ServedPoint:
        return self._sources.get(self._point)

    def read(self, offset: int, length: int) -> bytes:
        return self._served().read(offset, length)

    def segments(self, offset: int, length: int, limit: int = 0) -> list[tuple[int, int, bool]]:
        return self._served().segments(offset, length, limit)


def default_name(point: RecoveryPoint) -> str:
    """``boot-`` and the first 8 hex digits of the point's id."""
    return f"boot-{point.id[:8]}"


def nbd_uri(host: str, port: int, name: str) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"nbd://{shown}:{port}/overlay/{name}"


def guest_size(point: RecoveryPoint, memory: int | None, cpus: int | None) -> tuple[int, int]:
    """(memory MiB, CPUs): the options when given, else the backed-up VM's configuration
    (vSphere points, capped to the host), else 512 MiB and 1 CPU."""
    vm = (point.vsphere or {}).get("vm") or {}
    if memory is None:
        memory = int(vm.get("memory_mib") or DEFAULT_MEMORY_MIB)
        cap = int(psutil.virtual_memory().total * MAX_HOST_MEMORY_SHARE) >> 20
        if memory > cap:
            note(
                f"the VM had {memory} MiB of memory; booting with {cap} MiB "
                "(half of this host's; --memory sets it)"
            )
            memory = cap
    if cpus is None:
        cpus = min(int(vm.get("cpus") or 1), os.cpu_count() or 1)
    return memory, cpus


def qemu_command(binary: str, uri: str, memory: int, kvm: bool, cpus: int = 1) -> list[str]:
    """Serial on stdio, no display, no network, the disk as the first IDE drive (BIOS 0x80)."""
    return [
        binary,
        *(KVM_ARGS if kvm else TCG_ARGS),
        "-smp",
        str(cpus),
        "-m",
        str(memory),
        "-display",
        "none",
        "-serial",
        "stdio",
        "-nic",
        "none",
        "-drive",
        f"file={uri},format=raw,if=ide,index=0,media=disk",
        "-boot",
        "c",
    ]


def libvirt_xml(name: str, host: str, port: int, memory: int, kvm: bool, cpus: int = 1) -> str:
    """A libvirt domain that boots the same overlay from the same NBD server."""
    kind = "kvm" if kvm else "qemu"
    return f"""<domain type='{kind}'>
  <name>comb-{name}</name>
  <memory unit='MiB'>{memory}</memory>
  <vcpu>{cpus}</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <boot dev='hd'/>
  </os>
  <features><acpi/></features>
  <devices>
    <disk type='network' device='disk'>
      <driver name='qemu' type='raw'/>
      <source protocol='nbd' name={quoteattr("overlay/" + name)}>
        <host name={quoteattr(host)} port='{port}'/>
      </source>
      <target dev='hda' bus='ide'/>
    </disk>
    <serial type='pty'><target port='0'/></serial>
    <console type='pty'><target type='serial' port='0'/></console>
  </devices>
</domain>"""


def _accel(binary: str, args: argparse.Namespace) -> Accel:
    mode = "kvm" if args.kvm else args.accel
    chosen = choose(binary, mode) if os.path.exists(binary) else Accel(mode == "kvm", "no QEMU")
    name = "kvm" if chosen.kvm else "tcg"
    print(f"comb: accelerator {name}: {chosen.why}", file=sys.stderr, flush=True)
    return chosen


def _print_plan(repo: str, point: RecoveryPoint, name: str, args: argparse.Namespace) -> int:
    host, port = parse_listen(args.listen or f"{DEFAULT_HOST}:{DEFAULT_PORT}")
    port = port or DEFAULT_PORT
    binary = shutil.which(QEMU) or QEMU
    memory, cpus = guest_size(point, args.memory, args.cpus)
    kvm = _accel(binary, args).kvm
    cmd = qemu_command(binary, nbd_uri(host, port, name), memory, kvm, cpus)
    serve = ["comb", "-r", repo, "serve", "--listen", f"{host}:{port}"]
    serve += ["--overlay", f"{name}={point.id}"]
    print(f"# 1. serve the overlay:\n{shlex.join(serve)}")
    print(f"# 2. boot it with QEMU:\n{shlex.join(cmd)}")
    print("# or with libvirt (virsh create FILE):")
    print(libvirt_xml(name, host, port, memory, kvm, cpus))
    return 0


def _open_overlay(r: Repository, point: RecoveryPoint, name: str) -> overlay.Overlay:
    if name not in overlay.names(r):
        overlay.create(r, name, point)
    opened = overlay.Overlay(r, name)
    if opened.base_id != point.id:
        opened.close()
        raise UsageError(
            f"overlay {name!r} is over recovery point {opened.base_id}, not {point.id} "
            "(choose another --name)"
        )
    return opened


def _run_qemu(cmd: list[str]) -> int:
    """Run QEMU in the foreground; SIGINT/SIGTERM ask it to stop. Its exit code (128+N when a
    signal N killed it)."""
    proc = subprocess.Popen(cmd)

    got: list[int] = []

    def stop(signum: int, frame: FrameType | None) -> None:
        got.append(signum)
        if proc.poll() is None:
            proc.terminate()

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            code = proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if got[:1] == [signal.SIGINT]:
        return EXIT_INTERRUPTED  # Ctrl-C stopped it, as it stops serve and mount
    return 128 - code if code < 0 else code


def _boot(r: Repository, point: RecoveryPoint, name: str, args: argparse.Namespace) -> int:
    binary = shutil.which(QEMU)
    if binary is None:
        raise QemuMissing(f"{QEMU} is not installed (install QEMU, e.g. qemu-system-x86)")
    host, port = parse_listen(args.listen or f"{DEFAULT_HOST}:0")
    if not is_loopback(host):
        raise UsageError(
            f"--listen {args.listen}: boot's server (no TLS) is for the QEMU it starts, so it "
            "listens on loopback only (serve --tls-cert serves other hosts)"
        )
    kvm = _accel(binary, args).kvm
    started = time.monotonic()
    opened = _open_overlay(r, point, name)
    try:
        server = NbdServer(r, host, port)
    except BaseException:
        opened.close()
        raise
    export = ServedOverlay(opened, _LazyBase(server.sources, point), point.chunk_size)
    server.overlays[f"overlay/{name}"] = export
    thread = threading.Thread(target=server.serve_forever, name="nbd server", daemon=True)
    thread.start()
    try:
        bound_host, bound_port = server.address
        memory, cpus = guest_size(point, args.memory, args.cpus)
        uri = nbd_uri(bound_host, bound_port, name)
        cmd = qemu_command(binary, uri, memory, kvm, cpus)
        print(
            f"comb: booting recovery point {point.id} of {point.source} through overlay {name} "
            f"({nbd_uri(bound_host, bound_port, name)}), ready in "
            f"{time.monotonic() - started:.3f} s",
            file=sys.stderr,
            flush=True,
        )
        code = _run_qemu(cmd)
    finally:
        server.shutdown()
        thread.join()
        failed = close_overlays({name: export})
    if failed is not None:
        raise failed
    return code


def cmd_boot(repo: str, args: argparse.Namespace) -> int:
    if args.memory is not None and args.memory < 1:
        raise UsageError(f"--memory {args.memory}: give a size in MiB (1 or more)")
    if args.cpus is not None and args.cpus < 1:
        raise UsageError(f"--cpus {args.cpus}: give 1 or more")
    if args.name is not None:
        overlay.check_name(args.name)
    r = Repository.open(repo, password=args.password)
    if args.print:
        point = r.resolve(args.point)
        return _print_plan(repo, point, args.name or default_name(point), args)
    # Held from before the point is resolved until QEMU and the server have stopped: prune
    # waits for it (FORMAT.md 13), so the base's files, opened lazily, stay.
    with reader_lock(r, "boot", long_lived=True):
        point = r.resolve(args.point)
        return _boot(r, point, args.name or default_name(point), args)
