"""The repository's locks as comb's jobs and commands take them: ``catalog.store.locks`` with
this process's command line in the lock file and its waits said on standard error."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager

from catalog.repo import Repository
from catalog.store import locks

from .console import note, waiting


def command_line() -> str:
    """What a lock file of a plain repository names: the command's first two arguments."""
    return " ".join(sys.argv[1:3])


@contextmanager
def writer_lock(repo: Repository, kind: str) -> Iterator[locks.Lock]:
    """The shared lock (session) of a backup (``catalog.store.locks.writer_lock``)."""
    with locks.writer_lock(repo.storage, kind, command_line(), waiting) as lock:
        yield lock


def reader_lock(
    repo: Repository, kind: str, long_lived: bool = False
) -> AbstractContextManager[None]:
    """A reader's shared lock (``catalog.store.locks.reader_lock``); a long-lived one that
    cannot lock says so."""

    def unlocked(why: str) -> None:
        note(f"{kind} holds no lock ({why}): a prune meanwhile may remove data it reads")

    return locks.reader_lock(repo.storage, repo.config, kind, long_lived, waiting, unlocked)


def ensure_locking(repo: Repository) -> None:
    """Set the ``locks`` feature (``catalog.store.locks.ensure_locking``) before removing data."""
    repo.config = locks.ensure_locking(repo.storage, repo.config)
