"""glibc's malloc in a process that runs backup or restore workers (the local engine's, a Ray
actor's, a restore's).

Blocks up to 32 MiB (glibc's ceiling for this setting) come from the heap, and freed memory is
kept for the next batch instead of going back to the kernel. Otherwise each batch's buffers
(MiBs: joined blobs, sealed chunks) are mapped or trimmed anew and every page faults again:
0.7 CPU-s of 9 on a 2 GiB full backup, all of it system time (bench/README.md "The default
repository at the machine's limit"). Peak memory is what the batches need either way.

Owns the two ``mallopt`` settings. Must not: allocate, or be called by a process that does
not run such workers (the settings are process-wide and stay).
"""

from __future__ import annotations

import ctypes

MALLOC_MMAP_THRESHOLD = 32 << 20
MALLOC_TRIM_THRESHOLD = 1 << 30
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)


def keep_freed_memory() -> bool:
    """Set both (process-wide); False where there is no glibc ``mallopt``."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD)
    return bool(ok and mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD))
