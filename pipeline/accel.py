"""QEMU's accelerator for ``comb boot``: KVM when it actually runs a guest here, else TCG.

An openable ``/dev/kvm`` is not enough: on the machines this was built on it exists, yet a
guest under KVM took 6–9 s to print its first byte or hung, and ``-cpu host`` aborted
(../shared/notes/virtual-drive.md). So ``--accel auto`` (the default) boots a 512-byte probe
disk that writes "OK" to the serial port, under TCG and under ``-accel kvm -cpu max``, and uses
KVM only when its "OK" arrives within ``PROBE_TIMEOUT_S`` and no later than
``max(KVM_START_S, KVM_VS_TCG × TCG's)``. Where KVM works, a guest starts in a fraction of a
second, faster than TCG; on the machines above the probe printed under KVM after 1.3–1.4 s
against 0.06–0.09 s under TCG, the sign of the broken nested KVM that later hangs real guests.
The verdict is cached per host kernel, QEMU binary and ``/dev/kvm`` device
(``$COMB_CACHE_DIR/accel.json``), so only the first boot on a machine pays for the probe
(about 0.2 s where KVM works, up to ``PROBE_TIMEOUT_S`` where it does not).
"""

from __future__ import annotations

import hashlib
import json
import os
import selectors
import subprocess
import tempfile
import textwrap
import time
from dataclasses import dataclass

from catalog.store.cachedir import cache_dir

PROBE_TIMEOUT_S = 3.0
KVM_START_S = 0.5
KVM_VS_TCG = 3.0
CACHE_NAME = "accel.json"
KVM_ARGS = ["-accel", "kvm", "-cpu", "max"]
TCG_ARGS = ["-accel", "tcg"]

# Real mode: mov dx, 0x3f8; mov al, 'O'; out dx, al; mov al, 'K'; out dx, al; cli; hlt; jmp $-1
_PROBE_CODE = bytes.fromhex("baf803b04feeb04beefaf4ebfd")
PROBE_SECTOR = _PROBE_CODE + bytes(510 - len(_PROBE_CODE)) + b"\x55\xaa"


@dataclass(frozen=True)
class Accel:
    kvm: bool
    why: str

    @property
    def args(self) -> list[str]:
        return KVM_ARGS if self.kvm else TCG_ARGS


def choose(binary: str, mode: str) -> Accel:
    """``mode``: "kvm" or "tcg" (forced), or "auto" (probed once per host, then cached)."""
    if mode == "kvm":
        return Accel(True, "asked for (--accel kvm)")
    if mode == "tcg":
        return Accel(False, "asked for (--accel tcg)")
    if not os.path.exists("/dev/kvm"):
        return Accel(False, "no /dev/kvm")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return Accel(False, "/dev/kvm is not accessible to this user")
    key = _host_key(binary)
    cached = _read_cache().get(key)
    if isinstance(cached, dict) and isinstance(cached.get("kvm"), bool):
        return Accel(cached["kvm"], f"{cached.get('why', '')} (probed {cached.get('when', '')})")
    found = decide(probe(binary, KVM_ARGS), probe(binary, TCG_ARGS))
    _write_cache(key, found)
    return found


def decide(kvm: tuple[float | None, str], tcg: tuple[float | None, str]) -> Accel:
    """From the two probes' (seconds to "OK" or None, detail)."""
    k, why = kvm
    t, _ = tcg
    if k is None:
        return Accel(False, f"no KVM guest output within {PROBE_TIMEOUT_S:g} s{why}")
    limit = max(KVM_START_S, KVM_VS_TCG * t) if t is not None else KVM_START_S
    if k > limit:
        tcg_s = f"{t:.2f} s" if t is not None else "nothing"
        return Accel(False, f"KVM started a guest in {k:.2f} s against {tcg_s} for TCG")
    return Accel(True, f"a KVM guest started in {k:.2f} s")


def probe(
    binary: str, accel: list[str], timeout: float = PROBE_TIMEOUT_S
) -> tuple[float | None, str]:
    """Boot the probe sector; (seconds until "OK" reached the serial port, or None; detail)."""
    with tempfile.TemporaryDirectory(prefix="comb-kvm-probe-") as tmp:
        disk = os.path.join(tmp, "probe.img")
        with open(disk, "wb") as fh:
            fh.write(PROBE_SECTOR)
        cmd = [binary, *accel, "-m", "16", "-nodefaults", "-display", "none"]
        cmd += ["-serial", "stdio", "-no-reboot"]
        cmd += ["-drive", f"file={disk},format=raw,if=ide,index=0,media=disk"]
        started = time.monotonic()
        try:
            proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
        except OSError as err:
            return None, f" (QEMU did not start: {err.strerror})"
        out = b""
        try:
            assert proc.stdout is not None
            with selectors.DefaultSelector() as sel:
                sel.register(proc.stdout, selectors.EVENT_READ)
                while b"OK" not in out:
                    left = timeout - (time.monotonic() - started)
                    if left <= 0 or not sel.select(left):
                        break
                    chunk = os.read(proc.stdout.fileno(), 4096)
                    if not chunk:
                        break
                    out += chunk
        finally:
            proc.kill()
            _, stderr = proc.communicate()
        took = time.monotonic() - started
        if b"OK" in out:
            return took, ""
        return None, why_not(stderr)


def why_not(stderr: bytes, width: int = 120) -> str:
    """ ": " and QEMU's last line of complaint, shortened at a word (never cut mid-word)."""
    lines = stderr.decode(errors="replace").strip().splitlines()
    return f": {textwrap.shorten(lines[-1], width, placeholder=' ...')}" if lines else ""


def _host_key(binary: str) -> str:
    st = os.stat(binary)
    kvm = os.stat("/dev/kvm")
    parts = [os.uname().release, binary, str(st.st_size), str(st.st_mtime_ns), str(kvm.st_rdev)]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]


def _cache_path() -> str:
    return os.path.join(cache_dir(), CACHE_NAME)


def _read_cache() -> dict[str, object]:
    try:
        with open(_cache_path(), encoding="utf-8") as fh:
            doc = json.load(fh)
        return doc if isinstance(doc, dict) else {}
    except (OSError, ValueError):
        return {}  # no cache, or a damaged one: probe again


def _write_cache(key: str, found: Accel) -> None:
    doc = _read_cache()
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    doc[key] = {"kvm": found.kvm, "why": found.why, "when": when}
    path = _cache_path()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(doc, fh, indent=2, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home: probe again next time
