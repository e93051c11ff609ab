"""comb's side of the filesystem worker (``drive.files.worker``): start it, answer its reads from
the point's block source, and turn its death, its silence or its error into one line.

A request that gets no frame for ``timeout`` seconds (the worker reads the disk through us, so
a working walk sends frames all the time) kills the worker: a hang in a parser costs one
request, never the server. The next request starts a new worker.

Owns the worker process and the request loop. Must not: parse a filesystem itself, or let a
worker's answer be anything but data (frames are JSON and Arrow IPC, never pickles).
"""

from __future__ import annotations

import io
import os
import select
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pyarrow as pa

from catalog.errors import FileSystemError, ReaderChanged
from catalog.read.source import BlockSource

from .wire import WireError, code_stamp, receive, send

DEFAULT_MEMORY = 2 << 30
DEFAULT_TIMEOUT = 60.0
MAX_WORKER_READ = 16 << 20


class Worker:
    """One worker process over one disk; requests are answered one at a time."""

    def __init__(
        self,
        source: BlockSource,
        memory: int = DEFAULT_MEMORY,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.source = source
        self.memory = memory
        self.timeout = timeout
        self.skipped: list[str] = []  # directories a walk could not list, one line each
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr: Any = None
        self._lock = threading.Lock()  # one request at a time
        self._holder: int | None = None

    def close(self) -> None:
        with self._lock:
            self._stop()

    def _start(self) -> subprocess.Popen[bytes]:
        if self._proc is None or self._proc.poll() is not None:
            self._stop()
            self._stderr = tempfile.TemporaryFile()
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "drive.files.worker", str(self.memory), code_stamp()],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self._stderr,
                bufsize=0,
                close_fds=True,
            )
        return self._proc

    def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            for pipe in (proc.stdin, proc.stdout):
                if pipe is not None:
                    pipe.close()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def request(
        self, header: dict[str, Any], what: str, body: bytes = b""
    ) -> tuple[dict[str, Any], bytes]:
        """One request (and its payload) and its answer: ``({...ok...}, payload)``; an error
        raises ``FileSystemError`` naming ``what`` (the volume)."""
        with self._held():
            for reply, payload in self._exchange(header, what, body):
                if "ok" in reply:
                    return reply["ok"], payload
            raise FileSystemError(f"{what}: the filesystem reader gave no answer")

    def stream(self, header: dict[str, Any], what: str) -> Iterator[tuple[pa.Table, list[Any]]]:
        """A walk's batches, as Arrow tables, each with the ``deps`` of the directories listed
        for it ([inode, [offset, length, ...] or None] each)."""
        with self._held():
            for reply, payload in self._exchange(header, what):
                if "batch" in reply:
                    with pa.ipc.open_stream(io.BytesIO(payload)) as batches:
                        yield batches.read_all(), list(reply.get("deps") or [])

    @contextmanager
    def _held(self) -> Iterator[None]:
        if self._holder == threading.get_ident():
            raise RuntimeError("a request to a worker inside one of its own answers")
        with self._lock:
            self._holder = threading.get_ident()
            try:
                yield
            finally:
                self._holder = None

    def _exchange(
        self, header: dict[str, Any], what: str, body: bytes = b""
    ) -> Iterator[tuple[dict[str, Any], bytes]]:
        proc = self._start()
        assert proc.stdin is not None and proc.stdout is not None
        finished = False
        try:
            send(proc.stdin, header, body)  # type: ignore[arg-type]
            while True:
                reply, payload = self._next(proc, what)
                if "read" in reply:
                    self._answer_read(proc, reply["read"])
                elif "skipped" in reply:
                    self.skipped.append(f"{what}: {reply['skipped'].get('error', '?')}")
                elif "error" in reply:
                    finished = True
                    kind = ReaderChanged if reply.get("changed") is True else FileSystemError
                    raise kind(f"{what}: {reply['error']}")
                else:
                    finished = "ok" in reply
                    yield reply, payload
                    if finished:
                        return
        except (WireError, BrokenPipeError) as err:
            finished = True
            self._stop_after(what, err)
        finally:
            if not finished:  # the caller left a walk early: the worker is mid-answer
                self._stop()

    def _next(self, proc: subprocess.Popen[bytes], what: str) -> tuple[dict[str, Any], bytes]:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], self.timeout)
        if not ready:
            self._stop()
            raise FileSystemError(
                f"{what}: the filesystem reader did not answer within {self.timeout:g} s "
                "(a damaged filesystem?); stopped it"
            )
        return receive(proc.stdout)  # type: ignore[arg-type]

    def _answer_read(self, proc: subprocess.Popen[bytes], span: Any) -> None:
        assert proc.stdin is not None
        offset, length = int(span[0]), int(span[1])
        if offset < 0 or not 0 < length <= MAX_WORKER_READ:
            send(proc.stdin, {"error": "a read out of range"})  # type: ignore[arg-type]
            return
        length = max(0, min(length, self.source.size - offset))
        buf = bytearray(length)
        if length:
            self.source.read_into(memoryview(buf), offset)
        send(proc.stdin, {"data": True}, buf)  # type: ignore[arg-type]

    def _stop_after(self, what: str, err: Exception) -> None:
        proc, code = self._proc, None
        if proc is not None:
            try:
                code = proc.wait(timeout=5)
            except subprocess.TimeoutExpired:  # alive but its pipe is broken: stopped below
                code = None
        tail = self._stderr_tail()
        self._stop()
        if code is not None and code < 0:
            why = f"was killed by signal {-code}"
        elif code:
            why = f"exited with status {code}"
        else:
            why = f"broke the protocol ({err})"
        raise FileSystemError(f"{what}: the filesystem reader {why}{tail}")

    def _stderr_tail(self) -> str:
        if self._stderr is None:
            return ""
        self._stderr.seek(0, os.SEEK_END)
        self._stderr.seek(max(0, self._stderr.tell() - 300))
        lines = self._stderr.read().decode("utf-8", "replace").strip().splitlines()
        return f": {lines[-1][:200]}" if lines else ""
