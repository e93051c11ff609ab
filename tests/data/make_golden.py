"""How the frozen golden repository of format version 1 (tests/data/golden-v1/) was made.

DO NOT RE-RUN THIS TO "UPDATE" THE GOLDEN REPOSITORY. golden-v1 is frozen: it is the proof that
repositories written by comb's first format version keep opening, verifying and restoring with
every later comb. If a change to comb makes tests/catalog/test_golden.py fail, the change broke
format compatibility; fix the change (or add a reader for version 1), never the golden data.
A new format version gets a new directory (golden-v2/) made by a copy of this script.

It was made in a checkout of comb at format version 1, with:

    python tests/data/make_golden.py --out tests/data/golden-v1

which refuses to write into an existing directory. It writes the repository to ``OUT`` and what
the tests expect of it (SHA-256 of the image at every point, stored bytes, the file list) to
``OUT.json``.

It was regenerated once, before the first release, because the point-id rule changed: the id
became the first 16 hex digits of the BLAKE3 of the point document's exact bytes, and the
document no longer holds an ``id`` field (it used to hash a canonical JSON form of the body).
No repository of the old rule was ever released, so no reader for it exists. The packs came out
byte-identical; the Parquet files changed too (they now carry page checksums). That was the
only regeneration: from the first release on, golden-v1 is frozen as described above.

The source image is deterministic (seeded generator, fixed offsets); only the repository id,
the point times (and so the point ids) and ``source_path`` differ between runs. Chunk size is the
default 64 KiB, a leaf 16 chunks (1 MiB). The image has 5 leaves, the last one partial:

point 1 ("full", 4 MiB + 12345 bytes):
    chunk 0       64 KiB random (stored raw: zstd cannot shrink it)
    chunk 1       compressible text (zstd)
    chunks 2-3    explicit zero bytes (read, recognised as zero, never stored)
    chunk 4       4 KiB random, then a hole (read as one chunk: data + zeros)
    chunks 5-31   hole (never read; leaf 1 is entirely a hole)
    chunks 32-39  compressible text, each chunk different
    chunk 40      a copy of chunk 1 (deduplicated inside the point)
    chunk 48      compressible text
    chunk 63      a hole, then 16 KiB random at its end
    chunk 64      12345 bytes of text: the partial last chunk
point 2 ("changed-extents", grown to 4 MiB + 100000 bytes), with a change list of:
    4 KiB random into chunk 1; 4 KiB text into the hole at 1 MiB + 300 KiB (a new leaf 1);
    64 KiB of zeros over chunk 4 (data becomes a zero chunk); an over-reported extent in
    chunk 48 that did not change (its leaf stays shared); text written after the old end
    (growth: the old partial chunk 64 is re-read and becomes a full chunk; the new partial last
    chunk 65 holds text, then a hole).
    Leaf 2 is not in the change list and is shared with point 1.
point 3 ("full-reread": no change list, everything is read again):
    zeros over chunk 0; chunk 1 back to its point-1 content (deduplicated against point 1);
    4 KiB random into chunk 48. Leaves 1, 2 and 4 are shared (with points 2, 1 and 2).

Backups run with ``--engine local --workers 1`` so that pack contents do not depend on thread
timing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
from typing import Any

CHUNK = 64 * 1024
LEAF = 16 * CHUNK
SEED = 20261124
SIZE_1 = 4 * LEAF + 12345
SIZE_2 = 4 * LEAF + 100000
SOURCE_NAME = "golden"


def text(n: int, tag: str) -> bytes:
    """n bytes of compressible but chunk-unique text."""
    out = bytearray()
    i = 0
    while len(out) < n:
        out += f"{tag} line {i:06d}: the quick brown comb skips over the lazy block\n".encode()
        i += 1
    return bytes(out[:n])


def pwrite(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(data)


def make_v1(path: str, rng: random.Random) -> None:
    with open(path, "wb") as fh:
        fh.truncate(SIZE_1)  # all hole
    pwrite(path, 0 * CHUNK, rng.randbytes(CHUNK))
    pwrite(path, 1 * CHUNK, text(CHUNK, "chunk-1"))
    pwrite(path, 2 * CHUNK, bytes(2 * CHUNK))
    pwrite(path, 4 * CHUNK, rng.randbytes(4096))
    for c in range(32, 40):
        pwrite(path, c * CHUNK, text(CHUNK, f"chunk-{c}"))
    pwrite(path, 40 * CHUNK, text(CHUNK, "chunk-1"))
    pwrite(path, 48 * CHUNK, text(CHUNK, "chunk-48"))
    pwrite(path, 64 * CHUNK - 16384, rng.randbytes(16384))
    pwrite(path, 64 * CHUNK, text(SIZE_1 - 64 * CHUNK, "tail"))


def make_v2(path: str, rng: random.Random) -> list[dict[str, int]]:
    """Apply point 2's changes; returns the change list (what change tracking would report)."""
    with open(path, "r+b") as fh:
        fh.truncate(SIZE_2)
    pwrite(path, CHUNK + 8192, rng.randbytes(4096))
    pwrite(path, LEAF + 300 * 1024, text(4096, "leaf-1"))
    pwrite(path, 4 * CHUNK, bytes(CHUNK))
    pwrite(path, SIZE_1, text(60000, "grown"))
    return [
        {"offset": CHUNK + 8192, "length": 4096},
        {"offset": LEAF + 300 * 1024, "length": 4096},
        {"offset": 4 * CHUNK, "length": CHUNK},
        {"offset": 48 * CHUNK + 1000, "length": 2000},  # over-reported: nothing changed there
        # The growth [SIZE_1, SIZE_2) is added by comb itself (the source grew).
    ]


def make_v3(path: str, rng: random.Random) -> None:
    pwrite(path, 0, bytes(CHUNK))
    pwrite(path, CHUNK, text(CHUNK, "chunk-1"))
    pwrite(path, 48 * CHUNK + 20000, rng.randbytes(4096))


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def comb(*argv: str) -> None:
    from pipeline.cli import main

    code = main(list(argv))
    if code != 0:
        raise SystemExit(f"comb {' '.join(argv)} failed with exit code {code}")


def query(repo: str, sql: str) -> list[dict[str, Any]]:
    from catalog.analytics.views import connect, run_query
    from catalog.repo import Repository

    r = Repository.open(repo)
    return run_query(connect(r.storage, r.points()), sql).to_pylist()  # type: ignore[no-any-return]


def make(out: str) -> dict[str, Any]:
    from catalog.repo import Repository

    rng = random.Random(SEED)
    work = tempfile.mkdtemp(prefix="comb-golden-")
    try:
        img = os.path.join(work, "disk.img")
        backup = ("backup", img, "--engine", "local", "--workers", "1")
        comb("-r", out, "init")
        make_v1(img, rng)
        digests = [sha256(img)]
        comb("-r", out, *backup, "--source-name", SOURCE_NAME)
        changes = make_v2(img, rng)
        changes_path = os.path.join(work, "changes.json")
        with open(changes_path, "w") as fh:
            json.dump(changes, fh)
        digests.append(sha256(img))
        comb("-r", out, *backup, "--source-name", SOURCE_NAME, "--changed-extents", changes_path)
        make_v3(img, rng)
        digests.append(sha256(img))
        comb("-r", out, *backup, "--source-name", SOURCE_NAME)
    finally:
        shutil.rmtree(work)
    points = Repository.open(out).points()
    manifests = {
        r["point_id"]: r
        for r in query(
            out,
            "SELECT point_id, count(*) AS data_chunks, CAST(sum(length) AS BIGINT) AS data_bytes "
            "FROM manifests GROUP BY point_id",
        )
    }
    chunks = query(
        out,
        "SELECT count(*) AS chunks, count(DISTINCT pack) AS packs, "
        "CAST(sum(stored_len) AS BIGINT) AS stored_bytes, "
        "CAST(sum(raw_len) AS BIGINT) AS raw_bytes FROM chunks",
    )[0]
    # Git keeps no empty directories: drop them here so the tests see what a checkout has.
    for d in ("locks", "tmp"):
        path = os.path.join(out, d)
        if os.path.isdir(path) and not os.listdir(path):
            os.rmdir(path)
    files = sorted(
        os.path.relpath(os.path.join(dp, f), out).replace(os.sep, "/")
        for dp, _dirs, fs in os.walk(out)
        for f in fs
    )
    return {
        "comment": "Expected facts of golden-v1, written by tests/data/make_golden.py. Frozen.",
        "format_version": 1,
        "source": SOURCE_NAME,
        "changed_extents_of_point_2": changes,
        "points": [
            {
                "id": p.id,
                "mode": p.mode,
                "parent": p.parent,
                "size": p.size,
                "sha256": digest,
                "bytes_stored": p.stats.bytes_stored,
                "data_chunks": manifests[p.id]["data_chunks"],
                "data_bytes": manifests[p.id]["data_bytes"],
            }
            for p, digest in zip(points, digests, strict=True)
        ],
        "chunks": chunks,
        "files": files,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="new directory for the repository")
    args = ap.parse_args()
    out = os.path.abspath(args.out)
    if os.path.exists(out) or os.path.exists(out + ".json"):
        print(f"{out} (or {out}.json) exists: golden repositories are frozen", file=sys.stderr)
        return 1
    expected = make(out)
    with open(out + ".json", "w") as fh:
        json.dump(expected, fh, indent=2, sort_keys=True)
        fh.write("\n")
    total = sum(os.path.getsize(os.path.join(out, f)) for f in expected["files"])
    print(f"wrote {out} ({len(expected['files'])} files, {total} bytes) and {out}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
