"""``python -m bench backup``: full, incremental and restore figures against issue 2's targets.

One run, one image, one order: full backups (local engine, Ray engine, peers) of the mixed image;
change (a) 1,000 scattered 4 KiB writes, then incrementals (comb with the change list in repo L,
comb without it in repo R, peers); change (b) 5 % of 64 KiB blocks rewritten, the same again;
restores of the latest point; then the 64 GiB sparse image's incremental metadata. Repo L and R
hold the same content before each incremental, so with/without the change list compare like for
like. Incrementals run on the local engine (a Ray incremental adds Ray's start-up, printed apart).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil

from catalog.repo import Repository
from catalog.store.crypto import ALGORITHM
from catalog.store.format import DEFAULT_ZSTD_LEVEL

from . import peers as peer_mod
from .backup_report import LIKE_PEERS, SPARSE, Results, print_report, to_json
from .image import (
    ChangeSet,
    change_block_rewrites,
    change_scattered_writes,
    generate_image,
    mixed_path,
    mixed_spec,
    parse_size,
    sparse_copy,
    sparse_spec,
    warm,
    warm_tree,
)
from .machine import (
    DEFAULT_WORKDIR,
    describe,
    header_lines,
)
from .memory import idle_ray
from .peers import PEER_ZSTD_LEVEL
from .runs import (
    BENCH_PASSWORD,
    BackupRun,
    backup,
    command_backup,
    fresh_repo,
    index_per_chunk,
    restore,
)
from .sampler import load_average


def _parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench backup", description=__doc__)
    ap.add_argument("--size", default="4G", help="mixed image size (default 4G)")
    ap.add_argument("--peers", action="store_true", help="also run restic and borg")
    ap.add_argument("--workdir", default=DEFAULT_WORKDIR, help="scratch space (images, repos)")
    ap.add_argument("--engines", default="local,ray", help="comb engines for the full backup")
    ap.add_argument("--skip-64g", action="store_true", help="skip the 64 GiB sparse case")
    ap.add_argument(
        "--repeat", type=int, default=1, help="rounds of full backups, all tools (best kept)"
    )
    ap.add_argument("--keep", action="store_true", help="keep repositories and work images")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument(
        "--repo",
        choices=("default", "plain"),
        default="default",
        help="comb's repositories: as `comb init` makes them (encrypted, parity; the default) "
        "or plain (`--encryption none`, parity kept)",
    )
    return ap.parse_args(argv)


class Bench:
    """The steps of one run, in order; figures accumulate in ``self.r``."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.workdir = os.path.abspath(args.workdir)
        self.engines = [e for e in args.engines.split(",") if e]
        self.image = os.path.join(self.workdir, "work.img")
        self.r = Results(parse_size(args.size))
        self.peers: list[peer_mod.Peer] = []
        self.encryption = ALGORITHM if args.repo == "default" else "none"
        self.r.extra["repository"] = "encrypted, parity" if args.repo == "default" else "plain"

    def path(self, name: str) -> str:
        return os.path.join(self.workdir, name)

    def fresh(self, name: str, zstd_level: int | None = None) -> Repository:
        """A new repository, and the source read through again (``warm``)."""
        repo = fresh_repo(self.path(name), encryption=self.encryption, zstd_level=zstd_level)
        warm(self.image)
        return repo

    # -- steps ---------------------------------------------------------------------------

    def prepare(self) -> None:
        os.makedirs(self.workdir, exist_ok=True)
        base = mixed_path(self.workdir, self.r.size, self.args.seed)
        info = generate_image(mixed_spec(self.r.size, self.args.seed), base)
        print(info.summary())
        sparse_copy(base, self.image)
        print(f"warm-up read of the source: {warm(self.image):.1f} s (all figures: warm source)")
        self.r.extra["image"] = {"bytes_by_kind": info.bytes_by_kind, "regions": info.regions}
        if self.args.peers:
            names = peer_mod.ensure_tools()
            self.peers = peer_mod.make_peers(names, self.workdir)
            self.r.extra["peer_versions"] = {
                p.name: peer_mod.tool_version(p.tool) for p in self.peers
            }

    def full_backups(self) -> None:
        """Rounds of (local, ray, peers), interleaved so that foreign load hits all alike."""
        if "ray" in self.engines:
            self.r.idle = idle_ray()
        best: dict[str, BackupRun] = {}
        best_peer: dict[str, peer_mod.PeerRun] = {}
        for i in range(max(1, self.args.repeat)):
            runs = [("local", backup(self.fresh("repo-L"), self.image, "local", "comb local"))]
            if DEFAULT_ZSTD_LEVEL != PEER_ZSTD_LEVEL:  # like for like with the peers' level
                label = f"comb local, zstd-{PEER_ZSTD_LEVEL}"
                repo_z = self.fresh("repo-Z", zstd_level=PEER_ZSTD_LEVEL)
                runs.append((LIKE_PEERS, backup(repo_z, self.image, "local", label)))
            if "ray" in self.engines:
                runs.append(("ray", backup(self.fresh("repo-R"), self.image, "ray", "comb ray")))
            else:  # repo R still needs the same content for the no-list incrementals
                backup(self.fresh("repo-R"), self.image, "local", "comb local (R)")
            for key, run in runs:
                if key not in best or run.wall_s < best[key].wall_s:
                    best[key] = run
                fc = run.usage.foreign_cores
                print(f"  round {i + 1}: {run.label} {run.wall_s:.2f} s (foreign {fc:.2f} cores)")
            for p in self.peers:
                p.init()
                warm(self.image)
                pr = p.backup(self.image, "full")
                if p.name not in best_peer or pr.wall_s < best_peer[p.name].wall_s:
                    best_peer[p.name] = pr
                fc = pr.usage.foreign_cores
                print(f"  round {i + 1}: {p.name} {pr.wall_s:.2f} s (foreign {fc:.2f} cores)")
        self.r.full.update(best)
        self.r.peer_runs.extend(best_peer.values())
        resident, chunks = index_per_chunk(
            Repository.open(self.path("repo-L"), password=BENCH_PASSWORD)
        )
        self.r.extra["index"] = {"resident_bytes": resident, "chunks": chunks}
        self.r.extra["full_rounds"] = max(1, self.args.repeat)
        cmd = command_backup(self.fresh("repo-M"), self.image, BENCH_PASSWORD)
        shutil.rmtree(self.path("repo-M"), ignore_errors=True)
        print(f"  comb backup (command, local engine): {cmd.wall_s:.2f} s, peak RSS "
              f"{cmd.peak_rss / 2**20:.0f} MiB (anonymous {cmd.peak_anon / 2**20:.0f}, "
              f"files {cmd.peak_file / 2**20:.0f})")  # fmt: skip
        self.r.command = cmd if cmd.returncode == 0 else None

    def incremental(self, change: ChangeSet) -> None:
        self.r.changes[change.name] = change
        warm(self.image)
        with_list = backup(
            Repository.open(self.path("repo-L"), password=BENCH_PASSWORD),
            self.image,
            "local",
            "comb, change list",
            changed_extents=change.extents_path,
        )
        warm(self.image)
        no_list = backup(
            Repository.open(self.path("repo-R"), password=BENCH_PASSWORD),
            self.image,
            "local",
            "comb, no change list",
        )
        runs: dict[str, BackupRun | peer_mod.PeerRun] = {"list": with_list, "nolist": no_list}
        for p in self.peers:
            if not p.full_only:
                warm(self.image)
                runs[p.name] = p.backup(self.image, change.name)
        self.r.incr[change.name] = runs
        print(f"  incrementals after {change.name}: done")

    def restore_all(self) -> None:
        """Each tool restores from a repository read through first (untimed): comb writes its
        packs with O_DIRECT, so they would come from the device while the peers' buffered
        writes sit in the page cache; warm for all, as the sources are."""
        repo = Repository.open(self.path("repo-L"), password=BENCH_PASSWORD)
        latest = max(repo.points(), key=lambda p: p.time)
        warm_tree(self.path("repo-L"))
        run = restore(repo, latest.id, self.path("restore.img"), "comb", reference=self.image)
        os.unlink(self.path("restore.img"))
        self.r.restores.append(run)
        for p in self.peers:
            if not p.full_only:
                warm_tree(p.repo)
                self.r.peer_runs.append(p.restore(self.image))

    def sparse_64g(self) -> None:
        spec = sparse_spec()
        base = self.path("sparse-64g.img")
        info = generate_image(spec, base)
        print(info.summary())
        work = self.path("sparse-work.img")
        sparse_copy(base, work)
        repo = fresh_repo(self.path("repo-S"), encryption=self.encryption)  # (its own image)
        full = backup(repo, work, "local", "64 GiB sparse full")
        change = change_scattered_writes(work, seed=21)
        incr = backup(
            repo, work, "local", "64 GiB sparse incr", changed_extents=change.extents_path
        )
        self.r.full[SPARSE] = full
        self.r.incr[SPARSE] = {"list": incr}
        if not self.args.keep:
            shutil.rmtree(self.path("repo-S"))
            os.unlink(work)

    def cleanup(self) -> None:
        if self.args.keep:
            return
        for name in ("repo-L", "repo-R", "repo-Z"):
            if os.path.exists(self.path(name)):
                shutil.rmtree(self.path(name))
        for p in self.peers:
            p.cleanup()
        os.unlink(self.image)
        for c in self.r.changes.values():
            if os.path.exists(c.extents_path):
                os.unlink(c.extents_path)


def main(argv: list[str]) -> int:
    args = _parse(argv)
    env = describe()
    print("\n".join(header_lines(env)))
    bench = Bench(args)
    try:
        bench.prepare()
        bench.full_backups()
        bench.incremental(change_scattered_writes(bench.image))
        bench.incremental(change_block_rewrites(bench.image))
        bench.restore_all()
        if not args.skip_64g:
            bench.sparse_64g()
        found = print_report(bench.r)
    finally:
        bench.cleanup()
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in load_average())}")
    print(json.dumps(to_json(bench.r, found, env)))
    return 0
