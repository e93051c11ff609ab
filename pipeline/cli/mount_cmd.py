"""``comb -r REPO mount MOUNTPOINT``: the FUSE virtual drive in the foreground.

Owns the command's checks (the mountpoint must be an existing, empty directory that is not
already a mount; ``/dev/fuse`` must exist; the binding must import), the repository's shared
``mount`` lock while mounted (FORMAT.md 13), its two output lines (where it is mounted, and that
it was unmounted) and its exit code: 0 after SIGTERM, SIGHUP or an unmount from outside, 130
after SIGINT (Ctrl-C). The filesystem itself is ``drive.fuse``.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal

from catalog.errors import UsageError, describe_os_error
from catalog.repo import Repository

from ..console import warn, warn_damaged
from ..locking import reader_lock
from . import EXIT_INTERRUPTED, Subparsers, command

DEV_FUSE = "/dev/fuse"


def add_parser(sub: Subparsers) -> None:
    s = command(
        sub,
        "mount",
        "mount every recovery point as disk image files (FUSE, read-only, in the foreground)",
        ["comb -r /backup/repo mount /mnt/comb    (umount /mnt/comb, or Ctrl-C, stops it)"],
        json=None,
    )
    s.add_argument("mountpoint", help="an empty directory")
    s.set_defaults(run=cmd_mount)


def cmd_mount(repo: str, args: argparse.Namespace) -> int:
    mountpoint = os.path.abspath(args.mountpoint)
    check_mountpoint(mountpoint)
    if not os.path.exists(DEV_FUSE):
        raise UsageError(f"cannot mount at {mountpoint}: {DEV_FUSE} is missing (no FUSE here)")
    try:
        from drive import fuse
    except ImportError as err:
        raise UsageError(
            f"cannot mount at {mountpoint}: the FUSE binding is missing ({err}); "
            "install libfuse3 and `pip install pyfuse3`"
        ) from None
    r = Repository.open(repo, password=args.password)

    def mounted() -> None:
        print(
            f"mounted {r.location} at {mountpoint} (read-only; Ctrl-C or umount to stop)",
            flush=True,
        )

    # Held from before the points are listed until unmounted: prune waits (FORMAT.md 13).
    with reader_lock(r, "mount", long_lived=True):
        fs = fuse.CombFS(r, warn=warn)
        warn_damaged(r)
        try:
            signum = fuse.serve(fs, mountpoint, mounted)
        finally:
            fs.views.close()  # the file view's filesystem workers
    print(f"unmounted {mountpoint}", flush=True)
    return EXIT_INTERRUPTED if signum == signal.SIGINT else 0


def check_mountpoint(path: str) -> None:
    """An existing, empty directory that is not a mount already (nor a stale FUSE mount)."""
    try:
        entries = os.listdir(path)
    except FileNotFoundError:
        raise UsageError(f"mountpoint {path} does not exist") from None
    except NotADirectoryError:
        raise UsageError(f"mountpoint {path} is not a directory") from None
    except OSError as err:
        hint = f" (a stale mount? try `umount {path}`)" if err.errno == errno.ENOTCONN else ""
        raise UsageError(f"mountpoint {path}: {describe_os_error(err)}{hint}") from None
    if os.path.ismount(path):
        raise UsageError(f"mountpoint {path} is already a mount point")
    if entries:
        raise UsageError(f"mountpoint {path} is not empty")
