"""The OS-disk half of ``python -m bench files-history``: an ext4 image of this machine's
``/usr`` (``mkfs.ext4 -d``, cached) backed up into fresh repositories with the file catalog off
(``--no-files``) and on (the backup, then ``index_after_backup`` as ``comb backup`` does), then
an incremental after 1 % of the regular files were rewritten (debugfs, on a copy), both ways.

Must not: judge targets (bench/README.md does).
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import time
from typing import Any

from catalog.repo import Repository
from pipeline.cli.catalog_cmd import index_after_backup

from .files import debugfs, rewrite
from .runs import backup, fresh_repo


def index_as_backup(repo: Repository, point_id: str, failures: list[str] | None = None) -> float:
    """The file catalog of a new point, as ``comb backup`` builds it after the backup. With
    ``failures``, a failed catalog is noted there and built again (as ``comb index`` would)."""
    t0 = time.perf_counter()
    got = index_after_backup(repo, [repo.resolve(point_id)], True)
    if point_id not in got and failures is not None:
        failures.append(point_id)
        t0 = time.perf_counter()
        got = index_after_backup(repo, [repo.resolve(point_id)], True)
    if point_id not in got:
        raise SystemExit(f"bench: no file catalog for {point_id} (see the warning above)")
    return time.perf_counter() - t0


def os_image(workdir: str, tree: str) -> tuple[str, list[str]]:
    """An ext4 image of ``tree`` (``mkfs.ext4 -d``, cached) and its regular files' paths."""
    image = os.path.join(workdir, "os-" + tree.strip("/").replace("/", "-") + ".ext4")
    names_path = image + ".files"
    if not os.path.exists(image):
        used, count = 0, 0
        names = []
        for folder, dirs, found in os.walk(tree):
            dirs[:] = [d for d in dirs if not os.path.ismount(os.path.join(folder, d))]
            for entry in (*dirs, *found):
                path = os.path.join(folder, entry)
                count += 1
                try:
                    st = os.lstat(path)
                except OSError:
                    continue
                used += st.st_blocks * 512
                if entry in found and os.path.isfile(path) and not os.path.islink(path):
                    names.append("/" + os.path.relpath(path, tree))
        tmp = image + ".tmp"
        with open(tmp, "wb") as f:
            f.truncate(int(used * 1.25) + count * 4096 + (256 << 20))
        print(f"  mkfs.ext4 -d {tree}: {count} entries, {used / 2**30:.1f} GiB", flush=True)
        subprocess.run(
            ["mkfs.ext4", "-q", "-F", "-N", str(count + 65536), "-d", tree, tmp],
            check=True,
            capture_output=True,
        )
        with open(names_path, "w") as f:
            f.writelines(n + "\n" for n in sorted(names))
        os.replace(tmp, image)
    with open(names_path) as f:
        return image, [n.rstrip("\n") for n in f]


def os_changed(image: str, names: list[str], workdir: str) -> str:
    """A copy of the OS image with every 100th regular file rewritten (1 %)."""
    copy = image + ".changed"
    if os.path.exists(copy):
        return copy
    subprocess.run(["cp", "--sparse=always", image, copy + ".tmp"], check=True)
    payload = os.path.join(workdir, "os-payload.txt")
    with open(payload, "w") as f:
        f.write("rewritten\n" * 20)
    picked = [n for n in names[::100] if " " not in n and '"' not in n]
    debugfs(copy + ".tmp", rewrite(picked, payload), workdir)
    os.replace(copy + ".tmp", copy)
    return copy


def os_round(workdir: str, image: str, changed: str, files: bool) -> dict[str, float]:
    """A full and an incremental backup into a fresh repository, the catalog on or off."""
    repo = fresh_repo(os.path.join(workdir, "os-repo"))
    out: dict[str, float] = {}
    for kind, source in (("full", image), ("incremental", changed)):
        run = backup(repo, source, "local", f"os {kind}", source_name="os")
        out[f"{kind}_backup_s"] = run.wall_s
        out[f"{kind}_index_s"] = index_as_backup(repo, run.point_id) if files else 0.0
        out[f"{kind}_s"] = out[f"{kind}_backup_s"] + out[f"{kind}_index_s"]
    shutil.rmtree(repo.location)
    return out


def os_figures(workdir: str, tree: str, repeat: int) -> dict[str, Any]:
    image, names = os_image(workdir, tree)
    changed = os_changed(image, names, workdir)
    off: list[dict[str, float]] = []
    on: list[dict[str, float]] = []
    for _ in range(repeat):  # interleaved: a change in the machine's load hits both
        off.append(os_round(workdir, image, changed, False))
        on.append(os_round(workdir, image, changed, True))

    def med(rows: list[dict[str, float]]) -> dict[str, float]:
        return {k: statistics.median(r[k] for r in rows) for k in rows[0]}

    return {
        "image_bytes": os.path.getsize(image),
        "regular_files": len(names),
        "changed_files": len(names[::100]),
        "off": med(off),
        "on": med(on),
        "rounds": {"off": off, "on": on},
    }
