"""The filesystem worker: ``python -m drive.files.worker MEMORY_BYTES [STAMP]``, a child process
that parses a guest's filesystems, so a hostile or corrupt one can take down only itself. A
``STAMP`` other than its own ``wire.code_stamp`` (comb's code changed on disk since the parent
started) makes it answer every request with that one-line error.

It limits its own memory (RLIMIT_AS), may not write files (RLIMIT_FSIZE 0) or dump core, holds
no key and no repository: every byte of the disk is asked of the parent over the pipe
(``drive.files.wire``), through a cache of aligned blocks (some readers make 100k+ tiny reads
per walk). Requests, answered one at a time:

- ``open {volume: [offset, size]}`` → ``{root, block_size}``
- ``list {volume, inode}`` → ``{rows, deps}``, payload: the rows as a JSON list of lists in
  ``entries.Entry``'s order, names and targets as Latin-1 text (one character per byte: a
  worker that only lists never loads pyarrow, which costs more than the listing)
- ``lists {volume}``, payload: JSON ``[[inode, known, changed, before], ...]`` → ``{dirs}``,
  payload: JSON ``[[rows, deps, whole], ...]``: many directories at once, each whole or, with
  ``known``, ``changed`` and ``before``, maybe only its changed entries (``_list``); one that
  cannot be read is ``[null, null, "why"]``
- ``walk {volume, inode}`` → ``{batch, deps}`` frames (Arrow IPC streams of ``entries.SCHEMA``,
  ``parent`` set; ``deps``: per directory listed, where its listing came from), then ``{ok}``
- ``read {volume, inode, offset, length}`` → payload: the bytes
- ``runs {volume, inode}`` → ``{runs: [[file offset, length, volume offset], ...] | null}``
- ``xattrs {volume, inode}`` → ``{sizes: [[name length, value length], ...], problems: [line,
  ...]}``, payload: each name then its value (``drive.files.xattrs``)
- ``device {volume, inode}`` → ``{major, minor}``: a character or block device's number
  (``drive.files.devices``)

Any failure is answered ``{error: "one line"}`` and the worker carries on; a worker that
refuses (its ``STAMP``) adds ``changed: true`` (comb's fault, not the volume's).

Owns the worker's loop, its limits and its block cache. Must not: open a file of the host, hold
a key, or send anything but frames on its protocol pipe.
"""

from __future__ import annotations

import io
import json
import os
import resource
import struct
import sys
from collections import OrderedDict
from typing import Any, BinaryIO

from .backend import Filesystem, Row
from .tsk import TskFilesystem
from .wire import WireError, code_stamp, receive, send

BLOCK = 64 << 10
CACHE_BLOCKS = 1024  # 64 MiB
READ_AHEAD = 16  # blocks: 1 MiB
BATCH_ROWS = 50_000
MAX_LISTS = 1024  # directories in one ``lists`` request
MAX_READ = 16 << 20
MAX_DEPTH = 4096


class RemoteDisk:
    """The disk, read from the parent in aligned blocks kept in an LRU cache."""

    def __init__(self, inp: BinaryIO, out: BinaryIO) -> None:
        self._inp, self._out = inp, out
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._next_miss, self._ahead = -1, 1  # read-ahead: doubles while misses are in order

    def read(self, offset: int, length: int) -> bytes:
        first, last = offset // BLOCK, (offset + length - 1) // BLOCK
        if first == last:  # (most reads: TSK reads in 64 KiB blocks; no copy of the block)
            block = self._cache.get(first)
            if block is None:
                block = self._fetch(first, last)
            else:
                self._cache.move_to_end(first)
            skip = offset - first * BLOCK
            return block if skip == 0 and length >= len(block) else block[skip : skip + length]
        parts = []
        index = first
        while index <= last:
            block = self._cache.get(index)
            if block is None:
                block = self._fetch(index, last)
            else:
                self._cache.move_to_end(index)
            parts.append(block)
            index += 1
        data = b"".join(parts)
        skip = offset - first * BLOCK
        return data[skip : skip + length]

    def _fetch(self, index: int, last: int) -> bytes:
        """Blocks index.. (the missing run up to ``last``, and more when the misses go in order,
        as a table or a folder read through) in one request; returns block index."""
        self._ahead = min(self._ahead * 2, READ_AHEAD) if index == self._next_miss else 1
        count = 1
        while count < max(last - index + 1, self._ahead) and index + count not in self._cache:
            count += 1
            if count == READ_AHEAD:
                break
        self._next_miss = index + count
        send(self._out, {"read": [index * BLOCK, count * BLOCK]})
        header, data = receive(self._inp)
        if "data" not in header:
            raise OSError(header.get("error", "the parent sent no data"))
        for i in range(count):
            self._cache[index + i] = data[i * BLOCK : (i + 1) * BLOCK]
            while len(self._cache) > CACHE_BLOCKS:
                self._cache.popitem(last=False)
        return self._cache[index]


def _plain(rows: list[Row]) -> list[list[Any]]:
    """A listing's rows in JSON's terms (``list`` and ``lists``)."""
    return [[r[0].decode("latin-1"), *r[1:11], None if r[11] is None else r[11].decode("latin-1")]
            for r in rows]  # fmt: skip


def _json(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _table(rows: list[Row], parents: list[int] | None = None) -> bytes:
    import pyarrow as pa  # (here: only walks need it)

    from .entries import SCHEMA

    columns: list[Any] = list(zip(*rows, strict=True)) if rows else [[]] * (len(SCHEMA) - 1)
    arrays = [pa.array(parents or [0] * len(rows), pa.uint64())]
    arrays += [pa.array(col, SCHEMA.field(i + 1).type) for i, col in enumerate(columns)]
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, SCHEMA) as writer:
        writer.write_batch(pa.record_batch(arrays, schema=SCHEMA))
    return sink.getvalue()


class Worker:
    def __init__(self, inp: BinaryIO, out: BinaryIO) -> None:
        self.inp, self.out = inp, out
        self.disk = RemoteDisk(inp, out)
        self.volumes: dict[tuple[int, int], Filesystem] = {}
        self.refuse = ""  # a reason to answer every request with (``main``)

    def volume(self, header: dict[str, Any]) -> Filesystem:
        """The filesystem of ``header["volume"]``, opened by the backend for its type."""
        offset, size = (int(v) for v in header["volume"])
        fs = self.volumes.get((offset, size))
        if fs is None:

            def read(o: int, n: int) -> bytes:
                return self.disk.read(offset + o, n)

            fs = _backend(str(header.get("fstype") or ""))(read, size)
            self.volumes[(offset, size)] = fs
        return fs

    def serve(self) -> None:
        while True:
            try:
                header, body = receive(self.inp)
            except WireError:
                return
            try:
                self.handle(header, body)
            except WireError:
                return
            except MemoryError:
                send(self.out, {"error": "the filesystem reader ran out of its memory limit"})
            except RecursionError:
                send(self.out, {"error": "the filesystem nests too deeply"})
            except Exception as err:  # one line for anything the parser raises
                text = " ".join(str(err).split()) or type(err).__name__
                send(self.out, {"error": text[:300]})

    def handle(self, header: dict[str, Any], body: bytes = b"") -> None:
        op = header.get("op")
        if self.refuse:
            send(self.out, {"error": self.refuse, "changed": True})
            return
        if op == "open":
            fs = self.volume(header)
            send(self.out, {"ok": {"root": fs.root, "block_size": fs.block_size}})
        elif op == "list":
            fs, inode = self.volume(header), int(header["inode"])
            rows = fs.listdir(inode)
            deps = _deps(fs, inode, [row[2] for row in rows])
            send(self.out, {"ok": {"rows": len(rows), "deps": deps}}, _json(_plain(rows)))
        elif op == "lists":
            fs, out = self.volume(header), list[list[Any]]()
            for inode, known, changed, before in json.loads(body)[:MAX_LISTS]:
                try:
                    rows, whole, entries = _list(fs, int(inode), known, changed, before)
                except ValueError as err:  # this directory cannot be read: as a walk says
                    out.append([None, None, str(err)[:300]])
                    continue
                out.append([_plain(rows), _deps(fs, int(inode), entries), whole])
            send(self.out, {"ok": {"dirs": len(out)}}, _json(out))
        elif op == "walk":
            batch = min(max(int(header.get("batch_rows") or BATCH_ROWS), 1), BATCH_ROWS)
            self.walk(self.volume(header), int(header["inode"]), batch)
        elif op == "read":
            length = min(int(header["length"]), MAX_READ)
            data = self.volume(header).read(int(header["inode"]), int(header["offset"]), length)
            send(self.out, {"ok": {"length": len(data)}}, data)
        elif op == "runs":
            send(self.out, {"ok": {"runs": self.volume(header).runs(int(header["inode"]))}})
        elif op == "device":
            send(self.out, {"ok": _device(self.volume(header), int(header["inode"]))})
        elif op == "xattrs":
            answer, payload = _xattrs(self.volume(header), int(header["inode"]))
            send(self.out, {"ok": answer}, payload)
        else:
            send(self.out, {"error": f"unknown request {op!r}"})

    def walk(self, fs: Filesystem, top: int, batch: int = BATCH_ROWS) -> None:
        """Every entry under directory ``top``, depth first, each directory once (a directory
        reached twice, as in a loop a damaged filesystem can hold, is listed once)."""
        seen = {top}
        stack = [(top, 0)]
        rows: list[Row] = []
        parents: list[int] = []
        deps: list[Any] = []  # [directory inode, [offset, length, ...] or null]
        while stack:
            inode, depth = stack.pop()
            try:
                listing = fs.listdir(inode)
            except ValueError as err:
                send(self.out, {"skipped": {"inode": inode, "error": str(err)[:300]}})
                continue
            deps.append([inode, _deps(fs, inode, [row[2] for row in listing])])
            for row in listing:
                rows.append(row)
                parents.append(inode)
                if row[1] == "dir" and row[2] not in seen and depth < MAX_DEPTH:
                    seen.add(row[2])
                    stack.append((row[2], depth + 1))
            if len(rows) >= batch:
                send(self.out, {"batch": len(rows), "deps": deps}, _table(rows, parents))
                rows, parents, deps = [], [], []
        send(self.out, {"batch": len(rows), "deps": deps}, _table(rows, parents))
        send(self.out, {"ok": {}})


def _list(
    fs: Filesystem, inode: int, known: object, changed: object, before: object
) -> tuple[list[Row], bool, list[int]]:
    """A directory's rows (whole: True), or with ``known`` (its entries' inodes as listed
    before), ``changed`` (volume offsets and lengths changed since) and ``before`` (those its
    listing came from before), when its names cannot have changed, only the rows of the
    entries whose records changed (names empty; whole: False); and the inodes of all its
    entries."""
    plan = getattr(fs, "stale_entries", None)
    lists = (known, changed, before)
    if all(isinstance(v, list) for v in lists) and plan is not None:
        inodes = [int(v) for v in known]  # type: ignore[attr-defined]
        spans = [_pairs(changed), _merge(_pairs(before))]  # type: ignore[arg-type]
        again = plan(inode, inodes, *spans)
        if again is not None:
            return [fs.stat(v) for v in again], False, inodes  # type: ignore[attr-defined]
    rows = fs.listdir(inode)
    return rows, True, [row[2] for row in rows]


def _pairs(flat: list[Any]) -> list[tuple[int, int]]:
    return sorted((int(a), int(n)) for a, n in zip(flat[::2], flat[1::2], strict=True))


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted spans with touching or overlapping ones joined."""
    out: list[tuple[int, int]] = []
    for at, n in spans:
        if out and at <= out[-1][0] + out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], at + n - out[-1][0]))
        else:
            out.append((at, n))
    return out


def _deps(fs: Filesystem, inode: int, entries: list[int]) -> list[int] | None:
    """Where a directory's listing comes from (``Filesystem.deps``), as a flat list of volume
    offsets and lengths, ascending and merged; None where the backend cannot tell (the caller
    re-lists it always)."""
    method = getattr(fs, "deps", None)
    try:
        spans = method(inode, entries) if method is not None else None
    except (OSError, ValueError, struct.error):
        return None
    if spans is None:
        return None
    # (touching ranges as one: a folder's inodes are mostly neighbours in one table)
    return [v for span in _merge(sorted(spans)) for v in span]


def _xattrs(fs: Filesystem, inode: int) -> tuple[dict[str, Any], bytes]:
    """The inode's extended attributes (``Filesystem.xattrs``; none from a backend without it)
    as the answer's sizes and problems and its payload."""
    method = getattr(fs, "xattrs", None)
    found, problems = method(inode) if method is not None else ([], [])
    sizes = [[len(name), len(value)] for name, value in found]
    lines = [" ".join(str(p).split())[:300] for p in problems[:100]]
    return {"sizes": sizes, "problems": lines}, b"".join(n + v for n, v in found)


def _device(fs: Filesystem, inode: int) -> dict[str, int]:
    """The device number of ``inode`` (``Filesystem.device``), as the answer."""
    method = getattr(fs, "device", None)
    if method is None:
        raise ValueError(f"inode {inode}: this filesystem keeps no device numbers")
    major, minor = method(inode)
    return {"major": int(major), "minor": int(minor)}


def _backend(fstype: str) -> type[Filesystem]:
    """The backend that reads ``fstype``: libfsxfs for XFS, The Sleuth Kit for ext, NTFS, FAT
    and exFAT."""
    if fstype == "xfs":
        from .yal import XfsFilesystem

        return XfsFilesystem
    return TskFilesystem


def _limit(memory: int) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def main() -> None:
    memory = int(sys.argv[1]) if len(sys.argv) > 1 else 2 << 30
    inp = os.fdopen(os.dup(0), "rb")
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # a library's print goes to standard error, never into the protocol
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    stamp = sys.argv[2] if len(sys.argv) > 2 else code_stamp()
    _limit(memory)
    worker = Worker(inp, out)
    if stamp != code_stamp():
        worker.refuse = (
            "comb's code changed on disk since this command started (an upgrade while it ran?): "
            "run it again"
        )
    worker.serve()


if __name__ == "__main__":
    main()
