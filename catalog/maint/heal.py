"""Checking a pack against its parity file and healing it from parity (FORMAT.md 13, 15).

``check_parity`` says, for bytes a scrub has read, whether the parity file is there and whole
and how far it rebuilds a damaged pack (nothing is written). ``heal_pack`` runs under the
exclusive lock: it reads the pack and its parity again (the scan ran unlocked), and replaces a
damaged pack by its rebuilt original bytes (proven by the BLAKE3 name) through the storage's
tmp + fsync + rename, and rewrites a missing or damaged parity file from an intact pack.
Must not: decide which packs to heal, touch the index, or remove anything (catalog.maint.scrub).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import blake3

from catalog.errors import CombError
from catalog.store.packs import pack_name
from catalog.store.parity import (
    ParityFile,
    ParityGeometry,
    parity_name,
    parse_parity,
    rebuild,
    write_parity,
)
from catalog.store.storage import Storage


@dataclass
class ParityCheck:
    """The parity side of one scrubbed pack."""

    problem: str = ""  # "" when the parity file is there and whole
    missing: bool = False
    rebuilt: bytes | None = None  # a damaged pack's bytes as far as parity rebuilds them
    whole: bool = False  # ``rebuilt`` is the original pack (its name checks)
    shards: int = 0  # data shards parity rebuilt
    lost: list[tuple[int, int]] = field(default_factory=list)  # pack ranges beyond parity


def _load(storage: Storage, pid: str) -> tuple[ParityFile | None, ParityCheck]:
    name = parity_name(pid)
    where = storage.local_path(name) or name
    try:
        raw = storage.read(name)
    except CombError:
        if not storage.exists(name):
            return None, ParityCheck(f"pack {pid[:16]} has no parity file {where}", True)
        return None, ParityCheck(f"parity {where} cannot be read")
    try:
        return parse_parity(raw, where, pid), ParityCheck()
    except CombError as err:
        return None, ParityCheck(err.message)


def check_parity(storage: Storage, pid: str, data: bytes, intact: bool) -> ParityCheck:
    """The parity file of pack ``pid`` (whose bytes are ``data``): present, whole, and for a
    damaged pack how much of it it rebuilds."""
    pf, out = _load(storage, pid)
    if pf is None:
        return out
    if intact:
        bad = pf.bad_parity_shards()
        if bad:
            out.problem = f"parity of pack {pid[:16]}: {bad} damaged parity shard(s)"
        return out
    r = rebuild(data, pf)
    out.rebuilt, out.shards, out.lost = r.data, r.shards_rebuilt, r.lost
    out.whole = r.whole and blake3.blake3(r.data).hexdigest() == pid
    if r.parity_bad:
        out.problem = f"parity of pack {pid[:16]}: {r.parity_bad} damaged parity shard(s)"
    elif r.whole and not out.whole:  # self-consistent, and still not this pack's bytes
        out.problem = (
            f"parity of pack {pid[:16]} rebuilds bytes that do not match the pack's name "
            "(it is not this pack's parity: forged or misplaced)"
        )
    return out


@dataclass
class Healed:
    pack: str
    action: str  # "rebuilt from parity", "parity rewritten", "not healable", "intact"
    shards: int = 0
    rebuilt: bytes | None = None  # a pack not healable: its bytes as far as parity rebuilt them
    why: str = ""


def _write_pack(storage: Storage, pid: str, data: bytes) -> None:
    new = storage.create(bulk=True)
    try:
        new.write(data)
        new.commit(pack_name(pid))  # tmp + fsync + rename: the damaged pack is replaced at once
    except BaseException:
        new.abort()
        raise


def heal_pack(storage: Storage, pid: str, geometry: ParityGeometry | None) -> Healed:
    """Under the exclusive lock: heal pack ``pid`` from its parity, or rewrite its parity."""
    name = pack_name(pid)
    try:
        data = storage.read(name)
    except CombError as err:
        data, why = b"", err.message
    else:
        why = ""
    intact = blake3.blake3(data).hexdigest() == pid
    if intact and geometry is None:
        return Healed(pid, "intact")
    check = check_parity(storage, pid, data, intact)
    if intact:
        if not check.problem:
            return Healed(pid, "intact")
        assert geometry is not None
        write_parity(storage, geometry, data, pid)
        return Healed(pid, "parity rewritten")
    if check.whole and check.rebuilt is not None:
        _write_pack(storage, pid, check.rebuilt)
        if check.problem and geometry is not None:
            write_parity(storage, geometry, check.rebuilt, pid)
        return Healed(pid, "rebuilt from parity", check.shards)
    if check.rebuilt is None:
        why = why or check.problem or "no usable parity"
    elif not check.lost and check.problem:
        why = check.problem
    else:
        lost = sum(b - a for a, b in check.lost)
        why = f"damage beyond parity: {len(check.lost)} shard(s), {lost} bytes"
    return Healed(pid, "not healable", check.shards, check.rebuilt, why)
