"""An overlay as a backup source (``comb backup overlay:NAME``): its base recovery point with
the overlay's write records on top.

``OverlaySource`` is plain picklable configuration (repository path and overlay name), usable
wherever ``stages.sources.image.ImageSource`` is: each worker's ``open()`` replays the overlay's
logs read-only (no lock: the driver holds the overlay's lock for the whole backup, see
``pipeline.jobs.backup``) and reads the base point through ``Repository.reader``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from catalog.repo import Repository
from catalog.store.sealing import PLAIN, Sealer
from drive.overlays.reader import OverlayReader

from .plan import clip

PREFIX = "overlay:"


def overlay_name(source_path: str) -> str | None:
    """NAME of an ``overlay:NAME`` source, else None (an image file or block device)."""
    return source_path[len(PREFIX) :] if source_path.startswith(PREFIX) else None


@dataclass(frozen=True)
class OverlaySource:
    repo: str
    name: str
    # An encrypted repository's keys, from the driver (a worker cannot ask for the password).
    sealer: Sealer = field(default=PLAIN, repr=False)

    def open(self) -> OpenOverlay:
        return OpenOverlay(self.repo, self.name, self.sealer)

    def describe(self) -> str:
        return PREFIX + self.name


class OpenOverlay(OverlayReader):
    """An overlay open read-only, with the source-handle interface the backup reader uses."""

    def __init__(self, repo_path: str, name: str, sealer: Sealer = PLAIN) -> None:
        super().__init__(Repository.open(repo_path, sealer=sealer), name)

    def data_extents(self, start: int, end: int) -> list[tuple[int, int]]:
        """The base point's data runs and every written run (data or zeros), merged."""
        return clip(self.extents(), start, end)
