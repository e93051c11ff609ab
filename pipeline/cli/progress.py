"""The progress of a long command (backup, restore, export, verify, scrub), in the unit it counts
(bytes, in binary units as every size comb prints, or packs): on a terminal, a bar with what is
done of what, the rate and the time left; with ``--json``, status lines on standard error (JSON
Lines, README.md "Progress"); nothing otherwise. Until the first report the bar says what is
starting (``starting Ray ...``) instead of counting ``0/?``. The jobs report ``(done, total)``
and know nothing of how it is shown."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from ..console import human_bytes

Report = Callable[[int, int], None]  # (done, total) in the bar's unit
BYTES = "bytes"
PACKS = "packs"
# With --json: at most one status line per interval, besides the first report and the last.
STATUS_INTERVAL_S = 1.0


def counted(unit: str, done: float, total: float | None) -> str:
    """``12.0 MiB/96.0 MiB`` or ``3/40 packs``; nothing while the total is unknown."""
    if total is None:
        return ""
    if unit == BYTES:
        return f"{human_bytes(done)}/{human_bytes(total)}"
    return f"{int(done)}/{int(total)} {unit}"


def rate(unit: str, per_second: float | None) -> str:
    """``512.0 MiB/s`` or ``3.5 packs/s``; nothing before there is a rate."""
    if per_second is None:
        return ""
    return f"{human_bytes(per_second)}/s" if unit == BYTES else f"{per_second:.1f} {unit}/s"


class _Counted(ProgressColumn):
    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        return Text(counted(self.unit, task.completed, task.total))


class _Rate(ProgressColumn):
    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        return Text(rate(self.unit, task.finished_speed or task.speed))


class StatusLines:
    """``--json``: restic-style status lines on standard error. One at the start (``phase``
    ``starting``, no counts yet), then ``running`` lines with ``percent_done`` (0 to 1), the
    unit's ``<unit>_done`` and ``total_<unit>``, ``seconds_elapsed`` and ``seconds_remaining``:
    the first report, the last (everything done) and at most one per ``STATUS_INTERVAL_S``
    between them. Reports may come from several threads."""

    def __init__(self, unit: str, starting: str) -> None:
        self.unit = unit
        self.t0 = time.monotonic()
        self.last: float | None = None
        self.total: int | None = None
        self.done = False
        self.lock = threading.Lock()
        self._write({"phase": "starting", "percent_done": 0.0, "message": starting or "starting"})

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        with self.lock:
            final = done >= total
            waited = self.last is not None and now - self.last < STATUS_INTERVAL_S
            if self.done or (waited and not final):
                return
            self.last, self.done, self.total = now, final, total
            elapsed = now - self.t0
            doc: dict[str, Any] = {
                "phase": "running",
                "percent_done": round(min(done / total, 1.0), 4) if total > 0 else 1.0,
                f"{self.unit}_done": done,
                f"total_{self.unit}": total,
            }
            if 0 < done < total:
                doc["seconds_remaining"] = round(elapsed * (total - done) / done, 1)
            self._write(doc)

    def finish(self) -> None:
        """The command succeeded: its last line says everything is done (a restore's last
        report is where its data ends, not the disk's end)."""
        if not self.done and self.total is not None:
            self(self.total, self.total)

    def _write(self, doc: dict[str, Any]) -> None:
        doc.update(message_type="status", seconds_elapsed=round(time.monotonic() - self.t0, 3))
        print(json.dumps(doc, sort_keys=True), file=sys.stderr, flush=True)


class _Bar:
    """The terminal's bar: ``LABEL: STARTING`` and no counts until the first report, then
    ``LABEL``, the bar, done/total, the rate and the time left (timed from that report)."""

    def __init__(self, label: str, unit: str, starting: str, console: Console) -> None:
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            _Counted(unit),
            _Rate(unit),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        )
        self.label = label
        self.started = False
        self.task = self.progress.add_task(
            f"{label}: {starting}" if starting else label, total=None
        )

    def __call__(self, done: int, total: int) -> None:
        if self.started:
            self.progress.update(self.task, completed=done, total=total)
            return
        self.started = True
        self.progress.reset(self.task, total=total, completed=done, description=self.label)
        self.progress.refresh()


def _console() -> Console | None:
    """Where the bar is drawn: standard error, when it is a terminal."""
    return Console(stderr=True) if sys.stderr.isatty() else None


@contextmanager
def progress_bar(
    label: str, as_json: bool, unit: str = BYTES, starting: str = ""
) -> Iterator[Report | None]:
    """The report function of one command's progress (None: nothing is shown). ``label``
    begins the bar (``backup disk.img``); ``starting`` is what the bar says until the first
    report (``starting Ray ...``)."""
    if as_json:
        lines = StatusLines(unit, starting)
        yield lines
        lines.finish()
        return
    console = _console()
    if console is None:
        yield None
        return
    bar = _Bar(label, unit, starting, console)
    with bar.progress:
        bar.progress.refresh()
        yield bar
