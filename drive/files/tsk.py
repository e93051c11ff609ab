"""The Sleuth Kit backend (pytsk3) of the filesystem worker: ext2/3/4, NTFS, FAT12/16/32 and
exFAT, read through a ``read(offset, length)`` function over one volume.

Runs only inside the worker process (``drive.files.worker``): it parses untrusted guest data.

Owns the translation of TSK's directory entries, file reads and data runs into comb's terms.
Must not: be imported outside the worker, touch a file or a repository, or skip an error
silently (a bad entry is left out of a listing only when TSK itself cannot describe it).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from typing import Any

import pytsk3

from .backend import Row
from .devices import ext_device
from .records import ExtRecords, NtfsRecords
from .xattrs import ext_xattrs

_KIND = {
    pytsk3.TSK_FS_META_TYPE_REG: "file",
    pytsk3.TSK_FS_META_TYPE_DIR: "dir",
    pytsk3.TSK_FS_META_TYPE_LNK: "symlink",
    pytsk3.TSK_FS_META_TYPE_FIFO: "fifo",
    pytsk3.TSK_FS_META_TYPE_CHR: "chardev",
    pytsk3.TSK_FS_META_TYPE_BLK: "blockdev",
    pytsk3.TSK_FS_META_TYPE_SOCK: "socket",
}
_VIRTUAL = (pytsk3.TSK_FS_META_TYPE_VIRT, pytsk3.TSK_FS_META_TYPE_VIRT_DIR)
_HOLE = int(pytsk3.TSK_FS_ATTR_RUN_FLAG_FILLER) | int(pytsk3.TSK_FS_ATTR_RUN_FLAG_SPARSE)
_NOT_PLAIN = (
    int(pytsk3.TSK_FS_ATTR_RES) | int(pytsk3.TSK_FS_ATTR_COMP) | int(pytsk3.TSK_FS_ATTR_ENC)
)
_NTFS_INDEX_ALLOCATION = int(pytsk3.TSK_FS_ATTR_TYPE_NTFS_IDXALLOC)
_DATA_TYPES = (int(pytsk3.TSK_FS_ATTR_TYPE_DEFAULT), int(pytsk3.TSK_FS_ATTR_TYPE_NTFS_DATA))
_FAT_SPECIAL = (b"$ALLOC_BITMAP", b"$UPCASE_TABLE", b"$TEX_FAT")  # exFAT's own, as TSK lists
_EXT_INLINE_DATA = 0x10000000  # i_flags: the directory's entries are in the inode
_NTFS_SYSTEM_FILES = 27  # MFT records 0..26 are NTFS's own ($MFT, $Bitmap, $Extend, ...)

# ntfs-3g (how Linux writes NTFS) stores a symbolic link as an Interix one: a small file (its
# data kept in the MFT record, so reading it costs no disk read) of a magic and a UTF-16 target;
# a character or block device likewise (listed as one, its number never restored).
_INTERIX = b"IntxLNK\x01"
_INTERIX_MIN, _INTERIX_MAX = len(_INTERIX) + 2, 700
# A device: a magic, then its major and minor as 64-bit numbers.
_INTERIX_DEVICES = {b"IntxCHR\x00": "chardev", b"IntxBLK\x00": "blockdev"}
_INTERIX_DEVICE_SIZE = 24


class _Window(pytsk3.Img_Info):  # type: ignore[misc]
    """One volume as a TSK image: its bytes come from ``read``."""

    def __init__(self, read: Callable[[int, int], bytes], size: int) -> None:
        self._read = read
        self._size = size
        super().__init__(url="", type=pytsk3.TSK_IMG_TYPE_EXTERNAL)

    def read(self, offset: int, size: int) -> bytes:
        if offset >= self._size or size <= 0:
            return b""
        return self._read(offset, min(size, self._size - offset))

    def get_size(self) -> int:
        return self._size

    def close(self) -> None:
        pass


class TskFilesystem:
    """A volume's filesystem as TSK reads it."""

    def __init__(self, read: Callable[[int, int], bytes], size: int) -> None:
        self._image = _Window(read, size)
        try:
            self._fs = pytsk3.FS_Info(self._image, offset=0)
        except OSError as err:
            raise ValueError(_tsk_message(err, "no filesystem The Sleuth Kit can read")) from None
        info = self._fs.info
        self.root = int(info.root_inum)
        self.block_size = int(info.block_size)
        self._ntfs = info.ftype == pytsk3.TSK_FS_TYPE_NTFS
        self._fat = bool(int(info.ftype) & int(pytsk3.TSK_FS_TYPE_FAT_DETECT))
        self._open: tuple[int, Any] | None = None
        self._read = read
        self._size = size
        self._records: ExtRecords | NtfsRecords | None = None
        self._ext = bool(int(info.ftype) & int(pytsk3.TSK_FS_TYPE_EXT_DETECT))

    def listdir(self, inode: int) -> list[Row]:
        try:
            directory = self._fs.open_dir(inode=inode)
        except OSError as err:
            raise ValueError(
                _tsk_message(err, f"inode {inode} is not a readable directory")
            ) from None
        rows: list[Row] = []
        for entry in directory:
            row = self._row(entry, inode)
            if row is not None:
                rows.append(row)
        return rows

    def _row(self, entry: Any, parent: int) -> Row | None:
        name = entry.info.name
        if name is None or name.name in (b".", b"..") or not name.name:
            return None
        if not int(name.flags) & int(pytsk3.TSK_FS_NAME_FLAG_ALLOC):
            return None  # a deleted name still in the directory's blocks
        meta = entry.info.meta
        if meta is None or meta.type in _VIRTUAL:
            return None  # TSK's own additions ($OrphanFiles, $MBR, $FAT1)
        if parent == self.root and self._special(name.name, int(meta.addr), meta):
            return None
        return self._fields(bytes(name.name), entry, meta)

    def stat(self, inode: int) -> Row:
        """What a listing says of entry ``inode``, but its name (empty)."""
        try:
            handle = self._fs.open_meta(inode=inode)
        except OSError as err:
            raise ValueError(_tsk_message(err, f"inode {inode} cannot be opened")) from None
        if handle.info.meta is None:
            raise ValueError(f"inode {inode} has no metadata")
        return self._fields(b"", handle, handle.info.meta)

    def _fields(self, name: bytes, entry: Any, meta: Any) -> Row:
        addr = int(meta.addr)
        kind = _KIND.get(meta.type, "other")
        link = meta.link if kind == "symlink" else None
        if isinstance(link, str):
            link = link.encode("utf-8", "surrogateescape")
        if self._ntfs and kind == "file" and _INTERIX_MIN <= int(meta.size) <= _INTERIX_MAX:
            kind, link = _interix(entry, int(meta.size))
        return (
            name,
            kind,
            addr,
            int(meta.size) if kind in ("file", "symlink") else 0,
            int(meta.mode) & 0o7777,
            int(meta.uid),
            int(meta.gid),
            meta.mtime * 1_000_000_000 + (meta.mtime_nano or 0),
            meta.ctime * 1_000_000_000 + (meta.ctime_nano or 0),
            meta.atime * 1_000_000_000 + (meta.atime_nano or 0),
            int(meta.nlink),
            link or None,
        )

    def _special(self, name: bytes, addr: int, meta: Any) -> bool:
        """The filesystem's own entries in the root: NTFS's metadata files, a FAT volume label,
        exFAT's allocation bitmap and upcase table."""
        if self._ntfs:
            return addr < _NTFS_SYSTEM_FILES and name.startswith(b"$")
        if self._fat:
            label = name.endswith(b"(Volume Label Entry)")
            return label or (name in _FAT_SPECIAL and int(meta.mtime) == 0)
        return False

    def _file(self, inode: int) -> Any:
        if self._open is None or self._open[0] != inode:
            try:
                self._open = (inode, self._fs.open_meta(inode=inode))
            except OSError as err:
                raise ValueError(_tsk_message(err, f"inode {inode} cannot be opened")) from None
        return self._open[1]

    def read(self, inode: int, offset: int, length: int) -> bytes:
        try:
            return bytes(self._file(inode).read_random(offset, length))
        except OSError as err:
            raise ValueError(_tsk_message(err, f"inode {inode} cannot be read")) from None

    def runs(self, inode: int) -> list[tuple[int, int, int]] | None:
        """The file's data as (file offset, length, volume offset) runs, holes left out; None
        when its bytes are not plainly on disk (resident, compressed, encrypted)."""
        handle = self._file(inode)
        size = int(handle.info.meta.size)
        for attr in handle:
            info = attr.info
            if int(info.type) not in _DATA_TYPES or info.name not in (None, b"", b"$Data"):
                continue
            if int(info.flags) & _NOT_PLAIN:
                return None
            out = []
            for run in attr:
                if int(run.flags) & _HOLE:
                    continue
                start = int(run.offset) * self.block_size
                length = min(int(run.len) * self.block_size, size - start)
                if length > 0:
                    out.append((start, length, int(run.addr) * self.block_size))
            return out
        return [] if size == 0 else None

    def deps(self, inode: int, entries: list[int]) -> list[tuple[int, int]] | None:
        """The volume byte ranges the listing of directory ``inode`` (its entries' inodes
        ``entries``) comes from: the directory's blocks and, where entries keep records apart
        from it (ext's inodes, NTFS's MFT records), the directory's and every entry's record.
        None: unknown, and always on FAT and exFAT: a folder's listing also depends on its
        cluster chain in the FAT (a full folder grows into a new cluster without a byte of its
        old ones changing) and, on exFAT, on its length in its parent's entry."""
        if self._fat:
            return None
        spans = self._dir_spans(inode)
        if spans is None:
            return spans
        records = self._record_map()
        if records is None:
            return None
        for ino in (inode, *entries):
            at = records.offset(ino)
            if at is None:
                return None
            spans.append((at, records.length))
        return spans

    def stale_entries(
        self,
        inode: int,
        entries: list[int],
        changed: list[tuple[int, int]],
        old: list[tuple[int, int]],
    ) -> list[int] | None:
        """Which of directory ``inode``'s entries (their inodes, as listed before) must be read
        again after the volume ranges ``changed`` changed: those whose record lies in one. None:
        the directory must be listed again, as its names may have changed: one of its blocks
        lies in a changed range or outside ``old`` (the ranges its listing came from before:
        a block it gained), or, where its names may lie in its own record (NTFS, ext inline
        data), that record changed; or where they lie is unknown."""
        own = None if self._fat else self._dir_spans(inode)
        records = self._record_map()
        at = None if records is None else records.offset(inode)
        if own is None or records is None or at is None:
            return None
        if self._ntfs or self._inline(inode):
            own.append((at, records.length))
        if not all(_within(a, n, old) for a, n in own if n):
            return None
        starts = [a for a, _ in changed]
        ends = [a + n for a, n in changed]

        def hit(a: int, n: int) -> bool:  # (changed: sorted, not overlapping)
            i = bisect.bisect_right(starts, a + n - 1) - 1
            return i >= 0 and ends[i] > a

        if any(hit(a, n) for a, n in own):
            return None
        out = []
        for ino in entries:
            at = records.offset(ino)
            if at is None:
                return None
            if hit(at, records.length):
                out.append(ino)
        return out

    def xattrs(self, inode: int) -> tuple[list[tuple[bytes, bytes]], list[str]]:
        """The inode's extended attributes and ACLs in Linux's terms (``drive.files.xattrs``),
        and what could not be read of them. ext only: NTFS's security descriptors and EAs and
        FAT's attributes are no POSIX xattrs (none)."""
        if not self._ext:
            return [], []
        raw = self._ext_record(inode, "its xattrs")

        def ea_inode(number: int, size: int) -> bytes:
            return self.read(number, 0, size)

        got = ext_xattrs(inode, raw, self._read, self.block_size, self._size, ea_inode)
        return got.found, got.problems

    def device(self, inode: int) -> tuple[int, int]:
        """A character or block device's number (major, minor), from ext's inode record
        (TSK does not give it); NTFS, FAT and exFAT keep no device files."""
        if self._ntfs:
            raise ValueError(
                f"inode {inode}: an Interix device of ntfs-3g (comb does not restore NTFS's "
                "device files)"
            )
        if not self._ext:
            raise ValueError(f"inode {inode}: FAT and exFAT keep no device files")
        return ext_device(inode, self._ext_record(inode, "its device number"))

    def _inline(self, inode: int) -> bool:
        """Does ext directory ``inode`` keep its entries in its own record (inline data)? Else
        its record says only where its blocks lie, and those are read where they lie now: a
        change of the record alone (its times, a neighbour's in the same chunk) changes no
        name."""
        try:
            raw = self._ext_record(inode, "its flags")
        except ValueError:
            return True  # (unknown: as if it did)
        return bool(int.from_bytes(raw[32:36], "little") & _EXT_INLINE_DATA)

    def _ext_record(self, inode: int, purpose: str) -> bytes:
        """The raw record of ext inode ``inode`` (``records.ExtRecords``), whole."""
        records = self._record_map()
        at = None if records is None else records.offset(inode)
        if records is None or at is None:
            raise ValueError(f"inode {inode}: its record cannot be located for {purpose}")
        raw = self._read(at, records.length)
        if len(raw) != records.length:
            raise ValueError(f"inode {inode}: its record is cut short")
        return raw

    def _record_map(self) -> ExtRecords | NtfsRecords | None:
        if self._records is None:
            if self._ext:
                self._records = ExtRecords(self._read, self._size)
            elif self._ntfs:
                self._records = NtfsRecords(self._read, self._size, self.runs(0))
        return self._records if self._records is not None and self._records.ok else None

    def _dir_spans(self, inode: int) -> list[tuple[int, int]] | None:
        """Where a directory's own blocks lie (NTFS: its index allocation; its index root is in
        its MFT record)."""
        if not self._ntfs:
            runs = self.runs(inode)
            return None if runs is None else [(where, n) for _, n, where in runs]
        spans: list[tuple[int, int]] = []
        for attr in self._file(inode):
            if int(attr.info.type) != _NTFS_INDEX_ALLOCATION:
                continue
            if int(attr.info.flags) & _NOT_PLAIN:
                return None
            for run in attr:
                if not int(run.flags) & _HOLE:
                    n = int(run.len) * self.block_size
                    spans.append((int(run.addr) * self.block_size, n))
        return spans


def _within(at: int, n: int, spans: list[tuple[int, int]]) -> bool:
    """Is [at, at + n) inside the union of ``spans`` (sorted, touching ones merged)?"""
    i = bisect.bisect_right([a for a, _ in spans], at) - 1
    return i >= 0 and spans[i][0] + spans[i][1] >= at + n


def _interix(entry: Any, size: int) -> tuple[str, bytes | None]:
    """What a small NTFS file is in ntfs-3g's Interix forms: a symbolic link and its target, a
    character or block device (its number is not read: comb does not restore NTFS's device
    files), or else a plain file."""
    try:
        data = bytes(entry.read_random(0, size))
    except OSError:
        return "file", None
    if size == _INTERIX_DEVICE_SIZE and data[: len(_INTERIX)] in _INTERIX_DEVICES:
        return _INTERIX_DEVICES[data[: len(_INTERIX)]], None
    if not data.startswith(_INTERIX) or len(data) % 2:
        return "file", None
    try:
        target = data[len(_INTERIX) :].decode("utf-16-le").encode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        return "file", None
    return "symlink", target


def _tsk_message(err: OSError, fallback: str) -> str:
    """TSK's own words, shortened to the line that says what is wrong."""
    text = " ".join(str(err).split())
    return text[:200] if text else fallback
