"""Writing a generated disk image to a file: sequentially, holes left as holes, atomically."""

from __future__ import annotations

import mmap
import os
import secrets
import stat
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

from catalog.errors import OutputError
from drive.formats.image import VirtualImage

# Exports are written with O_DIRECT where the filesystem allows (as restore does): through the
# page cache the kernel's copy and dirty-page throttling took over half of an export's time.
_STAGE_BYTES = 16 << 20
_ALIGN_BYTES = 4096


def _direct_fd(path: str) -> int | None:
    if os.environ.get("COMB_DIRECT_IO", "1") == "0":
        return None
    try:
        return os.open(path, os.O_WRONLY | os.O_CLOEXEC | os.O_DIRECT)
    except OSError:
        return None  # tmpfs and some others refuse O_DIRECT: buffered writes then


def _write(fd: int, direct: int | None, stage: mmap.mmap | None, data: bytes, offset: int) -> None:
    """Aligned whole blocks go through the O_DIRECT descriptor (via the aligned staging
    buffer); headers, tables and an unaligned tail are written normally."""
    if direct is None or stage is None or offset % _ALIGN_BYTES:
        os.pwrite(fd, data, offset)
        return
    n = len(data) - len(data) % _ALIGN_BYTES
    if n:
        stage[:n] = data[:n]
        os.pwrite(direct, memoryview(stage)[:n], offset)
    if n < len(data):
        os.pwrite(fd, data[n:], offset + n)


def real_output(path: str) -> str:
    """Where an output named ``path`` is written: through symlinks, so a link (to a file or a
    device) is followed, never replaced by a file."""
    return os.path.realpath(path) if os.path.islink(path) else path


def adopt_attributes(fd: int, existing: str) -> None:
    """The new file ``fd``, about to replace the regular file ``existing`` (``--force``), takes
    its mode, owner and group: the contents are rewritten, not who may read them."""
    try:
        st = os.stat(existing)
    except FileNotFoundError:
        return
    if not stat.S_ISREG(st.st_mode):
        return
    os.fchmod(fd, stat.S_IMODE(st.st_mode))
    try:
        os.fchown(fd, st.st_uid, st.st_gid)
    except PermissionError:
        pass  # only root gives a file away: it stays the caller's


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
    output = real_output(output)
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
    direct = _direct_fd(tmp)
    stage = mmap.mmap(-1, _STAGE_BYTES) if direct is not None else None
    try:
        for offset, data in _ahead(image.pieces(_STAGE_BYTES)):
            _write(fd, direct, stage, data, offset)
            written += len(data)
        if direct is not None:
            os.fsync(direct)
        os.ftruncate(fd, image.size)
        adopt_attributes(fd, output)
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
        if direct is not None:
            os.close(direct)
        if stage is not None:
            stage.close()
        if not ok:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    return written
