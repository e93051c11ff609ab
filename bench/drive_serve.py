"""NBD and FUSE figures for ``python -m bench drive``: a point served by ``comb serve`` and
mounted by ``comb mount`` (each a separate process, as users run them).

A minimal NBD client (fixed newstyle, NBD_OPT_GO, simple replies) measures random 4 KiB reads
at queue depth 1 (one connection) and 16 (sixteen connections, one request each in flight);
``nbdcopy`` measures sequential reads. Must not: judge targets.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time

_IHAVEOPT = 0x49484156454F5054
_OPT_GO = 7
_REQUEST = 0x25609513
_REPLY = 0x67446698


class NbdClient:
    """Just enough NBD to read: handshake, NBD_OPT_GO, simple-reply READs."""

    def __init__(self, port: int, export: str) -> None:
        self.s = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._recv(18)
        self.s.sendall(struct.pack(">I", 3))  # fixed newstyle, no zeroes
        name = export.encode()
        data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
        self.s.sendall(struct.pack(">QII", _IHAVEOPT, _OPT_GO, len(data)) + data)
        while True:
            _magic, _opt, kind, n = struct.unpack(">QIII", self._recv(20))
            body = self._recv(n)
            if kind == 1:  # NBD_REP_ACK
                break
            if kind & 0x80000000:
                raise RuntimeError(f"NBD_OPT_GO refused ({kind:#x})")
            if body[:2] == b"\0\0":
                self.size = struct.unpack(">Q", body[2:10])[0]

    def _recv(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            part = self.s.recv(n - len(buf))
            if not part:
                raise EOFError("server closed the connection")
            buf += part
        return bytes(buf)

    def read(self, offset: int, length: int) -> bytes:
        self.s.sendall(struct.pack(">IHHQQI", _REQUEST, 0, 0, 1, offset, length))
        _magic, error, _cookie = struct.unpack(">IIQ", self._recv(16))
        if error:
            raise OSError(error, "NBD read failed")
        return self._recv(length)

    def close(self) -> None:
        self.s.close()


def start_server(repo: str) -> tuple[subprocess.Popen[str], int, float]:
    """``comb serve`` on an ephemeral port: (process, port, seconds until it accepted)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "-r", repo, "serve", "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    port = int(line.split("nbd://127.0.0.1:")[1].split("/")[0])
    return proc, port, time.perf_counter() - t0


def first_read_seconds(repo: str, export: str, offset: int) -> float:
    """Seconds from starting ``comb serve`` to the first 4 KiB read of ``export`` returning
    (the point is loaded on first connect, then read)."""
    t0 = time.perf_counter()
    proc, port, _ready = start_server(repo)
    try:
        client = NbdClient(port, export)
        client.read(offset, 4096)
        took = time.perf_counter() - t0
        client.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return took


def random_iops(port: int, export: str, extents: list[tuple[int, int]], qd: int, n: int) -> float:
    """4 KiB reads at random 4 KiB-aligned offsets inside the data, ``qd`` connections."""
    spots = [(o, ln) for o, ln in extents if ln >= 4096]
    weights = [ln for _, ln in spots]
    rng = random.Random(7)
    offsets = [
        o + rng.randrange(ln // 4096) * 4096 for o, ln in rng.choices(spots, weights=weights, k=n)
    ]
    clients = [NbdClient(port, export) for _ in range(qd)]

    def run(i: int) -> None:
        for off in offsets[i::qd]:
            clients[i].read(off, 4096)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(qd)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    for c in clients:
        c.close()
    return n / wall


def nbdkit_iops(image: str, extents: list[tuple[int, int]], n: int) -> float | None:
    """The ceiling beside comb's QD 1 figure: ``nbdkit file`` serving the restored raw image
    over the same loopback, read by the same client at the same offsets; None without
    nbdkit."""
    tool = shutil.which("nbdkit")
    if tool is None:
        return None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    proc = subprocess.Popen(
        [tool, "-f", "-r", "--exit-with-parent", "-i", "127.0.0.1", "-p", str(port), "file",
         image],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    return None
                time.sleep(0.05)
        return random_iops(port, "", extents, 1, n)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def nbdcopy_seconds(port: int, export: str) -> float | None:
    tool = shutil.which("nbdcopy")
    if tool is None:
        return None
    t0 = time.perf_counter()
    subprocess.run([tool, f"nbd://127.0.0.1:{port}/{export}", "null:"], check=True)
    return time.perf_counter() - t0


def fuse_seconds(repo: str, workdir: str, source: str, point: str) -> dict[str, float] | None:
    """Sequential read (1 MiB) of disk.img and disk.vhdx through ``comb mount``."""
    if not os.path.exists("/dev/fuse"):
        return None
    mnt = os.path.join(workdir, "drive-mnt")
    os.makedirs(mnt, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "-r", repo, "mount", mnt])
    out: dict[str, float] = {}
    try:
        deadline = time.time() + 30
        folder = os.path.join(mnt, source.replace("%", "%25").replace("/", "%2F"), point)
        while not os.path.isdir(folder):
            if time.time() > deadline or proc.poll() is not None:
                return None
            time.sleep(0.05)
        for name in ("disk.img", "disk.vhdx"):
            t0 = time.perf_counter()
            with open(os.path.join(folder, name), "rb", buffering=0) as fh:
                while fh.read(1 << 20):
                    pass
            out[name] = time.perf_counter() - t0
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return out


def boot_ready_seconds(repo: str, export: str, name: str = "bench-boot") -> float | None:
    """``comb boot``: seconds from starting the command to its NBD export being ready (its
    stderr line), for a point of any size; QEMU is then stopped and the overlay removed."""
    if shutil.which("qemu-system-x86_64") is None:
        return None
    cli = [sys.executable, "-m", "pipeline.cli", "-r", repo]
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [*cli, "boot", export, "--name", name],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        ready = time.perf_counter() - t0 if "ready in" in line else None
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        subprocess.run([*cli, "overlays", "rm", name], capture_output=True, check=False)
    return ready
