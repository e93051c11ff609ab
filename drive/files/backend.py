"""What the filesystem worker asks of a backend (``tsk.TskFilesystem``; more may follow):
``Filesystem`` and the ``Row`` it lists a directory entry as.

Owns the backend protocol. Must not: import a parsing library (backends do, inside the worker).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

# One directory entry, in the order of ``entries.SCHEMA`` after ``parent``: name, kind, inode,
# size, mode, uid, gid, mtime_ns, ctime_ns, atime_ns, nlink, target.
Row = tuple[bytes, str, int, int, int, int, int, int, int, int, int, bytes | None]


class Filesystem(Protocol):
    """A volume's filesystem as the worker reads it: made from a ``read(offset, length)`` over
    the volume and its size. Inodes are the backend's own numbers, stable within the volume;
    any failure raises (the worker answers it as one line)."""

    root: int
    block_size: int

    def __init__(self, read: Callable[[int, int], bytes], size: int) -> None: ...

    def listdir(self, inode: int) -> list[Row]: ...

    def read(self, inode: int, offset: int, length: int) -> bytes: ...

    def runs(self, inode: int) -> list[tuple[int, int, int]] | None: ...

    # Optional: ``deps(inode, entries) -> list[tuple[int, int]] | None``, the volume byte ranges
    # a directory's listing comes from (tsk.TskFilesystem.deps). A backend without it has every
    # directory re-listed by an incremental catalog.
    # Optional, with ``deps``: ``stale_entries(inode, entries, changed) -> list[int] | None``
    # (which entries' own records lie in the changed ranges; None: list it again) and
    # ``stat(inode) -> Row`` (an entry's row, name empty), so a directory whose names did not
    # change has only its changed entries read again.
    # Optional: ``xattrs(inode) -> tuple[list[tuple[bytes, bytes]], list[str]]``, the inode's
    # extended attributes and ACLs as Linux names and values (``drive.files.xattrs``) and one
    # line for each that could not be read. A backend without it has none.
    # Optional: ``device(inode) -> tuple[int, int]``, a character or block device's (major,
    # minor) in the range Linux's mknod takes (``drive.files.devices``); raises ValueError (one
    # line) when the record is damaged. A backend without it has none to restore.
