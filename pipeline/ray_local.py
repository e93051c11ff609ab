"""A Ray that ``ray start`` runs on this machine, for this user and this Python: the one
``--engine ray`` uses instead of starting its own (1-2 s to the first byte instead of 3-4 s).

It is used only when everything says it is this user's own head node: the address file
``ray start`` writes (``$RAY_TMPDIR``, else ``$TMPDIR``, else ``/tmp``, then
``ray/ray_current_cluster``) is a regular file owned by this user; the address in it is one of
this machine's; and a head raylet of this user runs for that address with this Python's ``bin``
directory (its workers must import comb and the same libraries). The raylet proves whose Ray
it is: no one else can run a process as this user, so a file rewritten by others (``/tmp/ray``
is everyone's, and under ``umask 0`` Ray writes the file writable by all) can at most name
another of this user's own heads. Who may connect to it is Ray's access control (token
authentication), as for the Ray comb starts itself. An embedded Ray (another comb's) writes no
such file; a worker node's file names a remote head. Anything else: None, and comb starts its
own.

Owns the discovery. Must not: import Ray (``pipeline.engines`` does), or connect to anything.
"""

from __future__ import annotations

import ipaddress
import os
import shlex
import stat
import sys

import psutil

ADDRESS_FILE_MAX = 4096


def address_file() -> str:
    if "RAY_TMPDIR" in os.environ:  # (as Ray reads them: a set but empty RAY_TMPDIR counts)
        base = os.environ["RAY_TMPDIR"]
    else:
        base = os.environ.get("TMPDIR") or "/tmp"
    return os.path.join(base, "ray", "ray_current_cluster")


def running_local_ray() -> str | None:
    """The GCS address of this user's Ray head on this machine, or None (above)."""
    address = _own_address_file()
    if address is None:
        return None
    host, _, port = address.rpartition(":")
    if not port.isdigit() or not _is_this_machine(host.strip("[]")):
        return None
    return address if _own_raylet_for(address) else None


def _own_address_file() -> str | None:
    try:
        # O_NONBLOCK: a FIFO put there by anyone (the directory is everyone's) must not hang
        fd = os.open(address_file(), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid() or not stat.S_ISREG(st.st_mode):
            return None
        text = os.read(fd, ADDRESS_FILE_MAX).decode("ascii", "replace").strip()
    except OSError:
        return None
    finally:
        os.close(fd)
    return text or None


def _is_this_machine(host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if ip.is_loopback:
        return True
    try:
        ours = {a.address.split("%")[0] for v in psutil.net_if_addrs().values() for a in v}
    except (OSError, psutil.Error):
        return False
    return str(ip) in ours


def _own_raylet_for(address: str) -> bool:
    """A head raylet of this user, for this GCS, whose Python workers run from this ``bin``."""
    ours = os.path.realpath(os.path.dirname(os.path.abspath(sys.executable)))
    flag, python_flag = f"--gcs-address={address}", "--python_worker_command="
    for proc in psutil.process_iter(["name", "uids"]):
        try:
            if proc.info["name"] != "raylet" or proc.info["uids"].real != os.geteuid():
                continue
            cmd = proc.cmdline()
        except (psutil.Error, AttributeError):
            continue
        if flag not in cmd or "--head" not in cmd:
            continue
        worker = next((a[len(python_flag) :] for a in cmd if a.startswith(python_flag)), "")
        try:
            python = shlex.split(worker)[0] if worker else ""
        except (ValueError, IndexError):
            continue
        if python and os.path.realpath(os.path.dirname(os.path.abspath(python))) == ours:
            return True
    return False
