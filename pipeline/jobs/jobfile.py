"""Job files (README "Jobs"): the sources a bulk job backs up, how often, and what it keeps.

A TOML file: ``[defaults]`` (``every``, ``keep``) and one ``[[source]]`` table per source
(``path``, required, a glob makes a source of each file it matches; ``name``, default its
absolute path as ``backup`` names it, not for a glob; ``every`` and
``keep``, default the defaults'; ``node``, the Ray nodes that may read it, default any:
``pipeline.ray_placement``). ``every`` is a duration (``"30m"``, ``"2s"``, ``"1h"``,
``"1d"``, ``"1w"``); ``keep`` holds ``forget``'s rules. Relative paths are relative to the
file's folder. Anything else (an unknown key, a wrong type, a duplicate source) is a one-line
usage error naming the file, the key and its line.

Owns reading and checking job files, and when a source is due. Must not: back anything up
(``pipeline.cli.job_cmd``).
"""

from __future__ import annotations

import glob
import os
import re
import stat
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from catalog.errors import CombError, UsageError
from catalog.maint.retention import KeepPolicy
from catalog.store.points import RecoveryPoint

from .vsphere import is_vsphere, parse_url

KEEP_RULES = ("last", "hourly", "daily", "weekly", "monthly", "yearly")
# A vsphere:// source's own keys (``backup``'s options of the same names), with their types.
VSPHERE_KEYS = ("disks", "all_disks", "quiesce", "cbt_audit", "insecure", "ca_file")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_SOURCE_KEYS = ("path", "name", "every", "keep", "node", *VSPHERE_KEYS)
_DEFAULT_KEYS = ("every", "keep")
MAX_EVERY_S = 10 * 366 * 86400  # ten years


@dataclass(frozen=True)
class JobSource:
    path: str  # absolute
    name: str
    every_s: float | None  # None: whenever the job runs
    keep: dict[str, int] = field(default_factory=dict)
    node: str | None = None  # read only on the Ray nodes this names
    pattern: bool = False  # ``path`` is a glob: ``expand`` makes a source of each match
    vsphere: dict[str, Any] | None = None  # a vsphere:// VM's options (``VSPHERE_KEYS``)

    def latest(self, latest: dict[str, RecoveryPoint]) -> RecoveryPoint | None:
        """This source's latest point, of each source's latest (``latest``); a VM's: its
        stalest disk's (the VM is due when one of its disks is)."""
        if self.vsphere is None:
            return latest.get(self.name)
        disks = [p for s, p in latest.items() if s.startswith(f"{self.name}/disk-")]
        return min(disks, key=lambda p: (p.time, p.id)) if disks else None

    @property
    def policy(self) -> KeepPolicy:
        return KeepPolicy(**self.keep)

    def due(self, last: RecoveryPoint | None, now: datetime) -> bool:
        """Whether a backup is due: none yet, or the latest began ``every`` ago. A little early
        counts (2 % of ``every``, at most a minute: a job run by a timer must not slip a round),
        and so does a latest point dated in the future (a clock set back)."""
        return self.due_in(last, now) <= 0

    def due_in(self, last: RecoveryPoint | None, now: datetime, exact: bool = False) -> float:
        """Seconds until a backup is due (``due``); 0 when it is due now. ``exact``: no slack
        (a server keeps its own time: the slack would make each period a little shorter)."""
        if last is None or self.every_s is None:
            return 0.0
        age = self.age(last, now)
        early = 0.0 if exact else self.slack
        return 0.0 if age < 0 else max(0.0, self.every_s - early - age)

    @property
    def slack(self) -> float:
        """How early a backup may start (2 % of ``every``, at least 1 s, at most a minute)."""
        return min(60.0, max(1.0, (self.every_s or 0.0) * 0.02))

    @staticmethod
    def age(last: RecoveryPoint, now: datetime) -> float:
        """Seconds since the point's backup began (its commit time less its duration: the
        data is that old)."""
        began = datetime.fromisoformat(last.time).timestamp() - last.stats.seconds
        return now.timestamp() - began


def load_job(path: str) -> list[JobSource]:
    try:
        raw = Path(path).read_text()
        data = tomllib.loads(raw)
    except tomllib.TOMLDecodeError as err:
        raise UsageError(f"job file {path}: not valid TOML: {' '.join(str(err).split())}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"cannot read job file {path}: {' '.join(str(err).split())}") from None
    return parse_job(data, raw, path)


def parse_job(data: dict[str, Any], raw: str, path: str) -> list[JobSource]:
    lines = raw.splitlines()

    def bad(key: str, what: str, block: int | None = None) -> UsageError:
        line = _line_of(lines, key, block)
        where = f", line {line}" if line else ""
        return UsageError(f"job file {path}{where}: `{key}` {what}")

    for key in data:
        if key not in ("defaults", "source"):
            raise bad(key, "is not a known key (known: [defaults], [[source]])")
    sources = data.get("source", [])
    if not isinstance(sources, list) or not sources:
        raise bad("source", "must be one or more [[source]] tables")
    for i, src in enumerate(sources):
        if not isinstance(src, dict):
            raise bad("source", "must be one or more [[source]] tables", i)
    defaults = data.get("defaults", {})
    if not isinstance(defaults, dict):
        raise bad("defaults", "must be a table")
    for key in defaults:
        if key not in _DEFAULT_KEYS:
            raise bad(f"defaults.{key}", f"is not a known key (known: {', '.join(_DEFAULT_KEYS)})")
    every = _every(defaults.get("every"), lambda w: bad("defaults.every", w))
    keep = _keep(defaults.get("keep", {}), "defaults.keep", bad)
    out: list[JobSource] = []
    base = Path(path).parent
    for i, src in enumerate(sources):
        job = _source(src, base, every, keep, lambda k, w, i=i: bad(k, w, i))
        given = src["path"]
        if any(o.path == job.path for o in out):
            raise bad("source.path", f"{given} is a second source's path", i)
        if any(o.name == job.name for o in out):
            raise bad("source.name", f"{job.name!r} names a second source", i)
        out.append(job)
    return out


def _source(
    src: dict[str, Any], base: Path, every: float | None, keep: dict[str, int], bad: Any
) -> JobSource:
    """One [[source]] table (``bad(key, what)``: the error naming its line)."""
    for key in src:
        if key not in _SOURCE_KEYS:
            raise bad(f"source.{key}", f"is not a known key (known: {', '.join(_SOURCE_KEYS)})")
    given = src.get("path")
    if not isinstance(given, str) or not given:
        raise bad("source.path", "must be a non-empty string (every source has one)")
    if is_vsphere(given):
        return _vm_source(src, given, base, every, keep, bad)
    for key in VSPHERE_KEYS:
        if key in src:
            raise bad(f"source.{key}", "applies to vsphere:// sources only")
    full = os.path.abspath(base / Path(given).expanduser())
    if glob.has_magic(given) and "name" in src:
        raise bad("source.name", "cannot name a glob's sources (each is named by its path)")
    name = src.get("name", full)
    if not isinstance(name, str) or not name.strip():
        raise bad("source.name", "must be a non-empty string")
    own_every = _every(src.get("every"), lambda w: bad("source.every", w))
    own_keep = _keep(src.get("keep"), "source.keep", bad)
    node = src.get("node")
    if node is not None and (not isinstance(node, str) or not node.strip()):
        raise bad("source.node", "must be a non-empty string (a Ray node's id, address, name, "
                  "resource or key=value label)")  # fmt: skip
    return JobSource(full, name, own_every or every, own_keep if "keep" in src else keep, node,
                     glob.has_magic(given))  # fmt: skip


def _vm_source(
    src: dict[str, Any], given: str, base: Path, every: float | None, keep: dict[str, int],
    bad: Any,
) -> JobSource:  # fmt: skip
    """A vsphere:// VM: named as its disks' points are (``vsphere://HOST[:PORT]/PATH``, each
    disk's ``/disk-KEY`` below), read from any node."""
    for key, why in (("name", "each disk's points are named by the VM and the disk's key"),
                     ("node", "a VM is read over the network, from any node")):  # fmt: skip
        if key in src:
            raise bad(f"source.{key}", f"does not apply to a vsphere:// source ({why})")
    try:
        url = parse_url(given)
    except UsageError as err:
        raise bad("source.path", f"is not a VM's address: {err.message}") from None
    folder, vm_name = url.path.rsplit("/", 1)
    if glob.has_magic(folder):
        raise bad("source.path", "has a glob before the VM's name (only the name may have one)")
    opts: dict[str, Any] = {}
    for key, kind in (("all_disks", bool), ("quiesce", bool), ("insecure", bool),
                      ("ca_file", str), ("cbt_audit", (int, float)), ("disks", list)):  # fmt: skip
        value = src.get(key)
        if value is None:
            continue
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise bad(f"source.{key}", "has the wrong type (as `backup`'s option of that name)")
        opts[key] = value
    if not all(isinstance(k, int) and not isinstance(k, bool) for k in opts.get("disks", [])):
        raise bad("source.disks", "must be a list of disk keys (integers)")
    if "ca_file" in opts:
        opts["ca_file"] = os.path.abspath(base / Path(opts["ca_file"]).expanduser())
    own_every = _every(src.get("every"), lambda w: bad("source.every", w))
    own_keep = _keep(src.get("keep"), "source.keep", bad)
    name = f"vsphere://{url.server}/{url.path}"
    return JobSource(given, name, own_every or every, own_keep if "keep" in src else keep,
                     pattern=glob.has_magic(vm_name), vsphere=opts)  # fmt: skip


VmLister = Callable[[JobSource], list[tuple[str, str]]]  # a glob of VMs -> (address, name)


def expand(
    sources: list[JobSource], list_vms: VmLister | None = None
) -> tuple[list[JobSource], dict[str, str]]:
    """The job's sources with each glob replaced by a source per match, and why each glob left
    (by its path) matches nothing. A file glob takes regular files and block devices, sorted;
    a glob of VMs the VMs ``list_vms`` finds (without it, globs of VMs stay as they are). A file
    or VM a source names already, under any name, or an earlier glob found, is not taken twice.
    Called at every run: what appears is backed up from then on."""
    out = [s for s in sources if not s.pattern]
    seen = {s.name for s in out} | {k for s in out if (k := _file_key(s)) is not None}
    why: dict[str, str] = {}
    for src in (s for s in sources if s.pattern):
        found: list[tuple[str, str, object]]
        if src.vsphere is not None:
            if list_vms is None:
                out.append(src)
                continue
            try:
                found = [(url, name, name) for url, name in list_vms(src)]
            except CombError as err:
                found, why[src.path] = [], err.message
        else:
            found = [(p, p, k) for p in sorted(glob.glob(src.path))
                     if (k := _file_key(replace(src, path=p))) is not None]  # fmt: skip
        for path, name, key in found:
            if key not in seen:
                out.append(replace(src, path=path, name=name, pattern=False))
                seen.add(key)
        if not found:
            out.append(src)
            kind = "VM" if src.vsphere is not None else "file"
            why.setdefault(src.path, f"no {kind} matches {src.path}")
    return out, why


def _file_key(src: JobSource) -> object | None:
    """What makes two names one source: a device's number, a file's inode; None for what is
    neither a regular file nor a block device (a folder a glob matched) or is gone."""
    if src.vsphere is not None:
        return src.name
    try:
        st = os.stat(src.path)
    except OSError:
        return src.path  # (its backup fails and says why)
    if stat.S_ISBLK(st.st_mode):
        return ("dev", st.st_rdev)
    return ("file", st.st_dev, st.st_ino) if stat.S_ISREG(st.st_mode) else None


def _every(value: object, bad: Any) -> float | None:
    if value is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*([smhdw])\s*", value) if isinstance(value, str) else None
    seconds = int(m.group(1)) * _UNITS[m.group(2)] if m is not None else 0
    if not 0 < seconds <= MAX_EVERY_S:
        raise bad('must be a duration such as "30m" (units s, m, h, d, w; at most ten years)')
    return float(seconds)


def _keep(value: object, key: str, bad: Any) -> dict[str, int]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise bad(key, f"must be a table of rules ({', '.join(KEEP_RULES)})")
    for rule, n in value.items():
        if rule not in KEEP_RULES:
            raise bad(f"{key}.{rule}", f"is not a known rule (known: {', '.join(KEEP_RULES)})")
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise bad(f"{key}.{rule}", "must be an integer, 0 or more")
    return dict(value)


def _line_of(lines: list[str], key: str, block: int | None) -> int | None:
    """The line (1-based) of ``key``'s first part below its table (``keep`` for
    ``source.keep.last``): in the ``block``-th [[source]], in [defaults], or at the top."""
    parts = key.split(".")
    table, name = (parts[0], parts[1]) if len(parts) > 1 else ("", parts[0])
    heads = [
        (n, "source" if re.match(r"\s*\[\[\s*source\s*\]\]", ln) else "defaults")
        for n, ln in enumerate(lines)
        if re.match(r"\s*\[\[\s*source\s*\]\]|\s*\[\s*defaults\s*\]", ln)
    ]
    spans = [(n, heads[j + 1][0] if j + 1 < len(heads) else len(lines), kind)
             for j, (n, kind) in enumerate(heads)]  # fmt: skip
    if table == "source" and block is not None:
        mine = [(a, b) for a, b, kind in spans if kind == "source"]
        start, end = mine[block] if block < len(mine) else (0, len(lines))
    elif table == "defaults":
        start, end = next(((a, b) for a, b, kind in spans if kind == "defaults"), (0, len(lines)))
    else:
        start, end = 0, heads[0][0] if heads else len(lines)
    pattern = re.compile(rf"^\s*{re.escape(name)}\s*[.=]")
    for n in range(start, end):
        if pattern.match(lines[n]):
            return n + 1
    return start + 1 if table else None
