"""Writing a generated disk image to a file: sequentially, holes left as holes, atomically."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

from catalog.errors import OutputError

from .image import VirtualImage


def _ahead(pieces: Iterator[tuple[int, bytes]]) -> Iterator[tuple[int, bytes]]:
    """The next piece is generated (read, decoded, checked) while this one is written."""
    with ThreadPoolExecutor(1, thread_name_prefix="comb-export") as pool:
        pending = pool.submit(next, pieces, None)
        while True:
            piece = pending.result()
            if piece is None:
                return
            pending = pool.submit(next, pieces, None)
            yield piece


def export_image(image: VirtualImage, output: str, force: bool = False) -> int:
    """Write ``image`` to ``output`` (a private temporary name, renamed when complete and
    durable); returns the bytes written (holes are not written)."""
    if os.path.exists(output) and not force:
        raise OutputError(f"{output} exists (use --force to overwrite)")
    head, tail = os.path.split(os.path.abspath(output))
    tmp = os.path.join(head, f".{tail}.comb-partial-{os.getpid()}-{secrets.token_hex(4)}")
    written = 0
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as err:
        raise OutputError(f"cannot write {output}: {err.strerror}") from None
    ok = False
    try:
        for offset, data in _ahead(image.pieces()):
            os.pwrite(fd, data, offset)
            written += len(data)
        os.ftruncate(fd, image.size)
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, output)
        dfd = os.open(head, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        ok = True
    except OSError as err:
        raise OutputError(f"cannot write {output}: {err.strerror}") from None
    finally:
        if fd >= 0:
            os.close(fd)
        if not ok:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    return written
