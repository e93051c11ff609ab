"""SIGINT and SIGTERM while a command runs: they interrupt the work, except where stopping
would make the outcome unclear.

``install`` (the command line, for the whole command) turns both signals into ``Interrupted``
(a ``KeyboardInterrupt``, so every cleanup path that handles Ctrl-C handles SIGTERM too).
After ``hold()`` (a backup's commit begins; the command returned) and inside ``deferred()``
(cleaning up after a failure) a signal is only noted: the commit finishes, Ray's shutdown is not
cut in the middle (a second signal there crashed the raylet client), and the command reports
what it committed instead of "interrupted". ``pending()`` says a signal arrived meanwhile. A
third signal while held interrupts anyway (someone insists). ``restore`` ends it all.
A long-running command (``job serve``) ends a hold with ``release`` after each round, and asks
for SIGHUP with ``watch_hangup``: it is only noted (``hangup``) and ends ``nap`` early. (The
handler sets a flag and nothing else: a lock taken in a handler can be the one the interrupted
code holds.)

Owns the signal handlers. Must not: print, or know what a command does.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_INSIST = 3  # signals inside deferred() that interrupt anyway


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived: the work stops (``signum`` says which)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_depth = 0
_noted: list[int] = []
_hup = [0, 0]  # SIGHUPs arrived, and seen by ``hangup``
NAP_SLICE_S = 0.2  # how soon ``nap`` sees a SIGHUP


def _handler(signum: int, frame: FrameType | None) -> None:
    if _depth > 0 and len(_noted) + 1 < _INSIST:
        _noted.append(signum)
        return
    raise Interrupted(signum)


def install() -> dict[int, object]:
    """Handle SIGINT and SIGTERM as above (main thread only; elsewhere nothing changes).
    Returns the previous handlers for ``restore``."""
    global _depth
    if threading.current_thread() is not threading.main_thread():
        return {}
    _depth = 0
    _noted.clear()
    return {sig: signal.signal(sig, _handler) for sig in SIGNALS}


def restore(previous: dict[int, object]) -> None:
    """The handlers from before ``install``; nothing held any more."""
    global _depth
    for sig, handler in previous.items():
        signal.signal(sig, handler)  # type: ignore[arg-type]
    _depth = 0
    _hup[1] = _hup[0]


@contextmanager
def deferred() -> Iterator[None]:
    """Signals that arrive inside are noted, not raised (see the module docstring). Without
    ``install`` (comb used as a library) Python's own SIGINT handling is left alone."""
    global _depth
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1


def hold() -> None:
    """From now until ``restore``, signals are only noted (a commit began: it ends, and the
    command reports it)."""
    global _depth
    _depth += 1


def pending() -> int | None:
    """The first signal noted inside ``deferred()`` or after ``hold()``, if any."""
    return _noted[0] if _noted else None


def release() -> int | None:
    """End a ``hold`` (the round it guarded is reported): signals interrupt again. Returns the
    signal noted meanwhile, if any (the caller stops: someone asked it to)."""
    global _depth
    late = pending()
    _depth = 0
    _noted.clear()
    return late


def watch_hangup() -> dict[int, object]:
    """SIGHUP is noted for ``hangup`` and ends ``nap`` (main thread only). Returns the previous
    handler for ``restore``."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    _hup[1] = _hup[0]
    return {signal.SIGHUP: signal.signal(signal.SIGHUP, _hangup)}


def _hangup(signum: int, frame: FrameType | None) -> None:
    _hup[0] += 1


def hangup() -> bool:
    """Whether SIGHUP arrived since the last call (one arriving meanwhile counts next time)."""
    arrived = _hup[0]
    came = arrived != _hup[1]
    _hup[1] = arrived
    return came


def nap(seconds: float) -> None:
    """Sleep up to ``seconds``; SIGHUP ends it early, SIGINT and SIGTERM interrupt it."""
    end = time.monotonic() + seconds
    while _hup[0] == _hup[1] and (left := end - time.monotonic()) > 0:
        time.sleep(min(left, NAP_SLICE_S))
