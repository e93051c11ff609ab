"""The processes an embedded Ray starts under comb, and comb's signal handlers around
``ray.init`` (``pipeline.engines`` calls both).

While Ray starts, SIGINT is ignored: Ray's processes inherit that (the terminal's Ctrl-C reaches
the whole group; Ray's processes killed under a running driver left orphans and crashed its
shutdown), so the driver alone stops and shuts Ray down. ``ray.init`` puts in a SIGTERM handler
of its own that exits at once; its exit is turned into comb's ``Interrupted`` (the caller
cleans up) and comb's handler is put back afterwards. Every process of the embedded Ray
descends from comb's; a worker still registering when the raylet stopped can outlive
``ray.shutdown()`` (seen: an orphaned ``ray::StageHost``), so ``reap`` kills what is left a few
seconds later, sparing the children comb had before.

Owns those handlers and the reaping. Must not: import Ray.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress

import psutil

from .signals import Interrupted

Key = tuple[int, float]


@contextmanager
def ray_starting() -> Iterator[None]:
    """Around ``ray.init`` (see the module docstring); elsewhere than the main thread, nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    term = signal.getsignal(signal.SIGTERM)
    try:
        yield
    except SystemExit as exit_:  # Ray's SIGTERM handler: sys.exit(SIGTERM)
        if exit_.code != signal.SIGTERM:
            raise
        raise Interrupted(signal.SIGTERM) from None
    finally:
        signal.signal(signal.SIGINT, previous)
        if term is not None:
            signal.signal(signal.SIGTERM, term)


def _key(proc: psutil.Process) -> Key:
    with suppress(psutil.Error):
        return proc.pid, proc.create_time()
    return proc.pid, 0.0


def children() -> set[Key]:
    """This process's descendants now (never Ray's to reap)."""
    return {_key(p) for p in psutil.Process().children(recursive=True)}


def descendants_since(before: set[Key]) -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=True) if _key(p) not in before]


def reap(procs: list[psutil.Process], grace_s: float) -> None:
    """Kill what of ``procs`` still runs ``grace_s`` from now."""
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for proc in alive:
        with suppress(psutil.Error):
            proc.kill()
