"""What a directory entry inside a recovery point is: ``Entry``, and the Arrow schema entries
travel in between the filesystem worker and comb (and that the file catalog builds on).

Names and symlink targets are bytes, exactly as the guest filesystem stores them: a name that is
not valid UTF-8 is kept, and only shown escaped (``display``).

Owns the entry record, its kinds, its Arrow and JSON forms, and the paths of a walk's rows.
Must not: read a filesystem, start a process, or know a repository.
"""

from __future__ import annotations

import json
from typing import NamedTuple

import pyarrow as pa
import pyarrow.compute as pc

KINDS = ("file", "dir", "symlink", "fifo", "chardev", "blockdev", "socket", "other")

SCHEMA = pa.schema(
    [
        ("parent", pa.uint64()),  # the directory's inode (walks); 0 in a plain listing
        ("name", pa.binary()),
        ("kind", pa.string()),
        ("inode", pa.uint64()),
        ("size", pa.int64()),
        ("mode", pa.int32()),  # permission bits, 0o7777
        ("uid", pa.int64()),
        ("gid", pa.int64()),
        ("mtime_ns", pa.int64()),
        ("ctime_ns", pa.int64()),
        ("atime_ns", pa.int64()),
        ("nlink", pa.int32()),
        ("target", pa.binary()),  # a symbolic link's target, else null
    ]
)


class Entry(NamedTuple):
    """One directory entry: a name and what its inode says (a tuple: walks make millions)."""

    name: bytes
    kind: str
    inode: int
    size: int = 0
    mode: int = 0
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    atime_ns: int = 0
    nlink: int = 1
    target: bytes | None = None

    @property
    def is_dir(self) -> bool:
        return self.kind == "dir"


def entries_from(table: pa.Table) -> list[Entry]:
    """The rows of an entry table (``SCHEMA``, any column order) as entries."""
    cols = [table.column(name).to_pylist() for name in Entry._fields]
    return [Entry(*row) for row in zip(*cols, strict=True)]


def entries_from_json(payload: bytes) -> list[Entry]:
    """Entries from their JSON form (the filesystem worker's ``list`` answer: a list of lists in
    ``Entry``'s order, names and targets as Latin-1 text), every field checked: a malformed one
    raises ValueError."""
    return entries_from_rows(json.loads(payload))


# A ``lists`` request of the filesystem worker for one directory: its inode, and its entries'
# inodes as listed before, the volume ranges changed since and those its listing came from
# (all three None: list it whole); and the answer: entries, deps, whole.
Ask = tuple[int, list[int] | None, list[int] | None, list[int] | None]
Answer = tuple[list["Entry"], list[int] | None, bool | str]  # (whole, or why it is unreadable)
MAX_SPANS = 1 << 20  # numbers in one directory's deps
# Each field's range (``SCHEMA``): a number out of it is a lie of the worker.
_I64, _I32 = (-(2**63), 2**63 - 1), (-(2**31), 2**31 - 1)
_RANGES = [(0, 2**64 - 1), _I64, (0, 0o7777), _I64, _I64, _I64, _I64, _I64, _I32]


def answers_from_json(payload: bytes, count: int, volume_size: int) -> list[Answer]:
    """The answers of a ``lists`` request (``count`` directories), every field checked."""
    answers = json.loads(payload)
    if not isinstance(answers, list) or len(answers) != count:
        raise ValueError("not one answer per directory")
    out: list[Answer] = []
    for answer in answers:
        if not isinstance(answer, list) or len(answer) != 3 or type(answer[2]) not in (bool, str):
            raise ValueError(f"an answer {str(answer)[:80]}")
        rows, deps, whole = answer
        if isinstance(whole, str):  # a directory that cannot be read, and why
            out.append(([], None, " ".join(whole.split())[:300] or "unreadable"))
            continue
        out.append((entries_from_rows(rows), checked_spans(deps, volume_size), whole))
    return out


def checked_spans(deps: object, volume_size: int) -> list[int] | None:
    """A directory's deps from the worker (offsets and lengths in its volume, or None), checked:
    pairs, inside the volume, not too many."""
    if deps is None:
        return None
    if not isinstance(deps, list) or len(deps) % 2 or len(deps) > MAX_SPANS:
        raise ValueError("deps that are not pairs of numbers")
    for at, n in zip(deps[::2], deps[1::2], strict=True):
        if type(at) is not int or type(n) is not int or at < 0 or n < 0 or at + n > volume_size:
            raise ValueError(f"deps outside the volume ({at}, {n})")
    return deps


def entries_from_rows(rows: object) -> list[Entry]:
    """Entries from the parsed JSON form (``entries_from_json``), checked the same way."""
    try:
        return [_entry(row) for row in rows]  # type: ignore[attr-defined]
    except (TypeError, AttributeError, UnicodeError) as err:
        raise ValueError(str(err)) from None


def _entry(row: list[object]) -> Entry:
    name, kind, *numbers, target = row
    if not isinstance(name, str) or kind not in KINDS or len(numbers) != 9:
        raise ValueError(f"a row {str(row)[:80]}")
    if any(type(v) is not int for v in numbers) or not isinstance(target, str | None):
        raise ValueError(f"a row {str(row)[:80]}")
    if any(not lo <= v <= hi for v, (lo, hi) in zip(numbers, _RANGES, strict=True)):  # type: ignore[operator]
        raise ValueError(f"a number out of range in {str(row)[:80]}")
    raw = None if target is None else target.encode("latin-1")
    return Entry(name.encode("latin-1"), str(kind), *numbers, raw)  # type: ignore[arg-type, call-arg]


def walk_paths(
    table: pa.Table, paths: dict[int, bytes]
) -> tuple[pa.Table, pa.Array, list[tuple[bytes, bytes]]]:
    """The rows of a walk batch (``SCHEMA``) whose folder is known and whose name can be a path
    component, their paths, and (folder path, name) of each left out for its name (``/`` or NUL
    in it, or ``.`` or ``..``); ``paths`` (folder inode → path) gains the batch's folders. A
    folder's row comes before its entries', so the folders are done in order first (the first
    name of a folder is the one walked), then every row at once, in Arrow."""
    names, parents = table.column("name"), table.column("parent")
    bad = pc.or_(pc.match_substring(names, "/"), pc.match_substring(names, "\0"))
    bad = pc.or_(bad, pc.is_in(names, value_set=pa.array([b".", b".."], pa.binary())))
    bad_rows = set(pc.indices_nonzero(bad).to_pylist())
    dirs = pc.indices_nonzero(pc.equal(table.column("kind"), "dir")).to_pylist()
    if dirs:
        sub = table.take(pa.array(dirs, pa.int64()))
        columns = (sub.column(c).to_pylist() for c in ("parent", "name", "inode"))
        for i, parent, name, inode in zip(dirs, *columns, strict=True):
            base = paths.get(parent)
            if base is not None and i not in bad_rows and inode not in paths:
                paths[inode] = base + b"/" + name
    parent_list = parents.to_pylist() if bad_rows else []  # (folders of this batch known now)
    left_out = [(paths[parent_list[i]], names[i].as_py()) for i in sorted(bad_rows)
                if parent_list[i] in paths]  # fmt: skip
    known = pc.unique(parents)
    where = pc.index_in(parents, value_set=known)
    parent_path = pa.array([paths.get(v) for v in known.to_pylist()], pa.binary()).take(where)
    keep = pc.and_(pc.invert(bad), pc.is_valid(parent_path))
    if not pc.all(keep).as_py():
        table, parent_path, names = (x.filter(keep) for x in (table, parent_path, names))
    joined = pc.binary_join_element_wise(parent_path, names, b"/")
    joined = joined.combine_chunks() if isinstance(joined, pa.ChunkedArray) else joined
    return table, joined, left_out


def display(raw: bytes) -> str:
    """A name or path for a terminal: UTF-8 as it is, with a backslash escape for every byte
    that is not valid UTF-8 (``\\xff``), every control character and the backslash itself, so two
    different names never look the same."""
    text = raw.decode("utf-8", "surrogateescape")
    if text.isprintable() and "\\" not in text:
        return text
    out = []
    for ch in text:
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:
            out.append(f"\\x{code - 0xDC00:02x}")
        elif ch == "\\":
            out.append("\\\\")
        elif ch.isprintable():
            out.append(ch)
        else:
            out.append(ch.encode("unicode_escape").decode("ascii"))
    return "".join(out)
