"""The one error tree of comb. Every error is one line naming the object, with an exit code.

Foreign exceptions (OSError, pyarrow, duckdb, zstd) are translated into these at package
boundaries. Errors must pickle, because they cross Ray process boundaries: every class keeps its
message in ``args`` and takes it as its only constructor argument.
"""

from __future__ import annotations


class CombError(Exception):
    """Base of every comb error; ``str(err)`` is the one-line message."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)

    @property
    def message(self) -> str:
        return str(self.args[0])

    def __str__(self) -> str:
        return self.message


class UsageError(CombError):
    """The command line or a request is malformed."""

    exit_code = 2


class RepositoryError(CombError):
    """The repository is missing, unreadable or of an unknown format version."""

    exit_code = 3


class PointNotFound(CombError):
    """No recovery point matches, or a prefix is ambiguous."""

    exit_code = 4


class SourceError(CombError):
    """The source (image file, block device) is missing, unreadable or inconsistent."""

    exit_code = 5


class ChangeListError(CombError):
    """A changed-extents file is malformed or out of range."""

    exit_code = 6


class CorruptionError(CombError):
    """Stored data does not match its id or its format (names path and offset)."""

    exit_code = 7


class StageError(CombError):
    """A pipeline stage failed; the message names the stage and the extent."""

    exit_code = 8


class SourceReadError(StageError):
    """A stage failed because its source could not be read (the source's fault: of several
    sources in one run, that one fails alone)."""


class QueryError(CombError):
    """Bad SQL, or a statement that would write."""

    exit_code = 9


class OutputError(CombError):
    """The restore target cannot be written."""

    exit_code = 10


def describe_os_error(err: OSError) -> str:
    """A short, stable description of an OSError without the Python class name."""
    return err.strerror or str(err)


class LockedError(CombError):
    """Another process holds a conflicting repository lock (and waiting for it timed out), or
    a holder lost its own (``catalog.store.locks.Lock.held``)."""

    exit_code = 11


class PasswordError(CombError):
    """The password opens none of an encrypted repository's key files."""

    exit_code = 12


class FileSystemError(CombError):
    """A point's partition table or a volume's filesystem cannot be read: unknown, damaged,
    encrypted, or its reader failed (names the volume and its offset)."""

    exit_code = 13


class ReaderChanged(FileSystemError):
    """The filesystem reader refused to work: comb's code changed on disk since the command
    started. Not the volume's fault: a file catalog is not committed without the volume (it is
    built again later), and running the command again reads it."""


class PathNotFound(CombError):
    """A path does not exist inside a recovery point (or is not what the command needs)."""

    exit_code = 14
