"""The figures of ``python -m bench backup``: what was measured, the tables, the targets.

Owns: ``Results`` (everything one run measured), the issue-2 targets computed from it, the
human-readable tables and the final JSON object. Must not: run anything.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from . import profile
from .image import GIB, ChangeSet
from .memory import IdleRay
from .peers import PeerRun
from .report import MIB, Target, mib, ratio, table, targets_table
from .runs import BackupRun, CommandRun, RestoreRun
from .sampler import Usage, load_average

SPARSE = "sparse-64g"
LIKE_PEERS = "local-like-peers"  # comb local at the peers' zstd level (when ours differs)


@dataclass
class Results:
    size: int
    full: dict[str, BackupRun] = field(default_factory=dict)
    incr: dict[str, dict[str, BackupRun | PeerRun]] = field(default_factory=dict)
    changes: dict[str, ChangeSet] = field(default_factory=dict)
    restores: list[RestoreRun] = field(default_factory=list)
    peer_runs: list[PeerRun] = field(default_factory=list)
    idle: IdleRay | None = None
    command: CommandRun | None = None  # ``comb backup --engine local`` in its own process
    extra: dict[str, Any] = field(default_factory=dict)

    def peer(self, tool: str, step: str) -> PeerRun | None:
        for run in self.peer_runs:
            if run.tool == tool and run.step == step:
                return run
        return None

    def comb_incr(self, change: str, key: str) -> BackupRun | None:
        run = self.incr.get(change, {}).get(key)
        return run if isinstance(run, BackupRun) else None

    def memory(self) -> dict[str, int | None]:
        local = self.full["local"].usage
        out: dict[str, int | None] = {
            "local_peak_pss": local.peak_pss,
            "local_growth_pss": local.peak_pss - local.start_pss,
            "ray_peak_pss": None,
            "ray_above_idle": None,
            "idle_ray_pss": None,
        }
        ray = self.full.get("ray")
        if ray is not None and self.idle is not None:
            # Above the driver as it was just before the run plus an idle Ray's daemons.
            out["ray_peak_pss"] = ray.usage.peak_pss
            out["idle_ray_pss"] = self.idle.ray_pss
            out["ray_above_idle"] = ray.usage.peak_pss - ray.usage.start_pss - self.idle.ray_pss
        return out


def _mbps(run: PeerRun | None) -> float | None:
    return run.mbps if run is not None else None


LOADED_CORES = 0.3  # foreign load above which a wall-time ratio is flagged


def _load_note(a: Usage, b: Usage | None) -> str:
    """Flags a wall-time ratio whose two runs saw different foreign load."""
    loads = [a.foreign_cores] + ([b.foreign_cores] if b is not None else [])
    if max(loads) <= LOADED_CORES:
        return ""
    return "under load: foreign cores " + " vs ".join(f"{x:.2f}" for x in loads)


def _cpu_note(r: Results, tool: str) -> str:
    """The load-robust view: CPU seconds per GB of comb local against the peer."""
    peer = r.peer(tool, "full")
    if peer is None:
        return ""
    mine = r.full["local"].cpu_s_per_gb
    theirs = peer.usage.cpu_s / (r.size / 1e9)
    return f"CPU-s/GB {mine:.2f} vs {theirs:.2f}"


def targets(r: Results) -> list[Target]:
    local, ray = r.full["local"], r.full.get("ray")
    restic, borg = _mbps(r.peer("restic", "full")), _mbps(r.peer("borg", "full"))
    b_name = next((k for k in r.incr if k.endswith("pct-64k")), "")
    cpu = {k: _cpu_note(r, k) for k in ("borg", "restic")}
    repo = r.extra.get("repository", "plain")
    peer_full = r.peer("borg", "full")
    borg_cpu = peer_full.usage.cpu_s / (r.size / 1e9) if peer_full is not None else None
    specs: list[tuple[str, float | None, str, float, str, str]] = [
        (f"full local ({repo}) / borg fixed-4M -e none (MB/s)", ratio(local.mbps, borg), ">=",
         2.0, "x", cpu["borg"]),
        ("full local CPU-s/GB / borg's", ratio(local.cpu_s_per_gb, borg_cpu), "<=", 1.0, "x", ""),
        ("full local / borg repokey-blake2 (MB/s)",
         ratio(local.mbps, _mbps(r.peer("borg-repokey", "full"))), ">=", 2.0, "x", ""),
        ("full local / restic (MB/s)", ratio(local.mbps, restic), ">=", 3.5, "x", cpu["restic"]),
        ("pipeline efficiency (local, measured / floor)", profile.efficiency(local), ">=", 0.85,
         "", ""),
    ]  # fmt: skip
    like = r.full.get(LIKE_PEERS)
    if like is not None:
        note = "informative: comb at borg's zstd level"
        specs.append((f"{like.label} / borg fixed-4M -e none (MB/s)", ratio(like.mbps, borg), ">=",
                      2.0, "x", note))  # fmt: skip
    if ray is not None:
        incl = f"incl. start-up {ray.mbps / local.mbps:.2f}x"
        specs += [
            ("full ray excl. start-up / borg", ratio(ray.mbps_work, borg), ">=", 2.0, "x", ""),
            ("full ray excl. start-up / restic", ratio(ray.mbps_work, restic), ">=", 3.5, "x", ""),
            ("ray / local, excl. Ray start-up", ratio(ray.mbps_work, local.mbps), ">=", 0.9, "x",
             incl),
        ]  # fmt: skip
    a_list = r.comb_incr("1000x4k", "list")
    if a_list is not None:
        stored = a_list.stats["bytes_stored"] / MIB
        specs.append(("1000x4k incr stored (change list)", stored, "<=", 70, "MiB", ""))
    b_list = r.comb_incr(b_name, "list")
    if b_list is not None:
        ch = r.changes[b_name]
        note = f"compressed change {mib(ch.compressed_bytes)} MiB"
        amp = b_list.stats["bytes_stored"] / max(1, ch.compressed_bytes)
        specs += [
            ("5% 64K incr stored / compressed change", amp, "<=", 1.2, "x", note),
            ("5% 64K incr wall / full local wall", b_list.wall_s / local.wall_s, "<=", 0.15,
             "x", _load_note(b_list.usage, local.usage)),
        ]  # fmt: skip
    for name in ("1000x4k", b_name):
        nolist = r.comb_incr(name, "nolist")
        if nolist is not None:
            wall = nolist.wall_s / local.wall_s
            note = _load_note(nolist.usage, local.usage)
            specs.append((f"{name} no-list incr wall / full wall", wall, "<=", 0.4, "x", note))
    sparse = r.comb_incr(SPARSE, "list")
    if sparse is not None:
        md = sparse.stats["metadata_bytes"] / MIB
        specs.append(("64 GiB sparse incr metadata", md, "<=", 2.0, "MiB", ""))
    if r.restores:
        peer_restore = r.peer("restic", "restore")
        rr = ratio(r.restores[0].mbps, _mbps(peer_restore))
        note = _load_note(r.restores[0].usage, peer_restore.usage if peer_restore else None)
        specs.append(("restore / restic restore (MB/s)", rr, ">=", 2.5, "x", note))
    mem = r.memory()
    if r.command is not None:
        peak = r.command.peak_rss / MIB
        specs.append(("local engine: comb backup peak RSS", peak, "<=", 512, "MiB", ""))
    if mem["ray_above_idle"] is not None:
        above = mem["ray_above_idle"] / MIB
        specs.append(("ray: all processes above idle Ray", above, "<=", 512, "MiB", ""))
    idx = r.extra["index"]
    per_chunk = idx["resident_bytes"] / max(1, idx["chunks"])
    specs.append(("dedup index resident / chunk", per_chunk, "<=", 16, "B", ""))
    return [Target(*s) for s in specs]


def _full_table(r: Results) -> str:
    size = r.size
    rows = []
    for key, run in r.full.items():
        if key == SPARSE:
            continue
        u = run.usage
        excl = f"{run.mbps_work:.0f}" if run.startup_s > 0.05 else ""
        rows.append([run.label, f"{run.wall_s:.2f}", f"{run.mbps:.0f}", excl,
                     f"{run.startup_s:.2f}", f"{run.cpu_s_per_gb:.2f}", f"{u.cores():.2f}",
                     mib(u.peak_pss), mib(run.repo_growth),
                     f"{u.foreign_cores:.2f}"])  # fmt: skip
    for p in r.peer_runs:
        if p.step == "full":
            u = p.usage
            rows.append([p.tool, f"{p.wall_s:.2f}", f"{p.mbps:.0f}", "", "",
                         f"{u.cpu_s / (size / 1e9):.2f}", f"{u.cores():.2f}", mib(u.peak_pss),
                         mib(p.repo_growth), f"{u.foreign_cores:.2f}"])  # fmt: skip
    header = ["run", "wall s", "MB/s", "MB/s excl. start-up", "start-up s", "CPU-s/GB", "cores",
              "peak PSS MiB", "repo growth MiB", "foreign cores"]  # fmt: skip
    repo = r.extra.get("repository", "plain")
    title = f"full backup, {size / GIB:g} GiB image, comb {repo} (MB/s = logical bytes / wall)"
    return table(title, header, rows)


def _incr_table(r: Results) -> str:
    rows = []
    for name, runs in r.incr.items():
        if name == SPARSE:
            continue
        ch = r.changes[name]
        for key, run in runs.items():
            cpu, fc = f"{run.usage.cpu_s:.2f}", f"{run.usage.foreign_cores:.2f}"
            if isinstance(run, BackupRun):
                s = run.stats
                rows.append([name, run.label, f"{run.wall_s:.2f}", mib(s["bytes_read"]),
                             mib(s["bytes_stored"]), mib(run.repo_growth),
                             f"{s['metadata_bytes'] / 1024:.0f}", cpu, fc])  # fmt: skip
            else:
                rows.append([name, key, f"{run.wall_s:.2f}", "", "", mib(run.repo_growth), "",
                             cpu, fc])  # fmt: skip
        rows.append([name, "(changed data; zstd-3 per 64 KiB block)", "", mib(ch.bytes_written),
                     mib(ch.compressed_bytes), "", "", "", ""])  # fmt: skip
    header = ["change", "run", "wall s", "read MiB", "stored MiB", "repo growth MiB",
              "metadata KiB", "CPU s", "foreign cores"]  # fmt: skip
    return table("incrementals (peers: repository growth)", header, rows, left=2)


def _restore_table(r: Results) -> str:
    rows = [[x.label, f"{x.wall_s:.2f}", f"{x.mbps:.0f}", f"{x.usage.cpu_s:.2f}",
             mib(x.usage.peak_pss), str(x.identical), f"{x.usage.foreign_cores:.2f}"]
            for x in r.restores]  # fmt: skip
    rows += [[p.tool, f"{p.wall_s:.2f}", f"{p.mbps:.0f}", f"{p.usage.cpu_s:.2f}",
              mib(p.usage.peak_pss), str(p.identical), f"{p.usage.foreign_cores:.2f}"]
             for p in r.peer_runs if p.step == "restore"]  # fmt: skip
    header = ["tool", "wall s", "MB/s", "CPU s", "peak PSS MiB", "identical", "foreign cores"]
    return table("restore of the latest point (fsync included)", header, rows)


def _ratio_table(r: Results) -> str:
    """comb / peer for every step both ran (speed: comb faster when > 1; bytes: peer / comb)."""
    local = r.full["local"]
    rows = []
    for tool in sorted({p.tool for p in r.peer_runs}):
        full = r.peer(tool, "full")
        if full is not None:
            rows.append([tool, "full backup MB/s (comb local / peer)", _x(local.mbps / full.mbps)])
            cpu = (full.usage.cpu_s / (r.size / 1e9)) / local.cpu_s_per_gb
            rows.append([tool, "full backup CPU-s/GB (peer / comb local)", _x(cpu)])
        for change, runs in r.incr.items():
            peer, mine = runs.get(tool), r.comb_incr(change, "list")
            if isinstance(peer, PeerRun) and mine is not None:
                rows.append([tool, f"{change} incr wall (peer / comb, change list)",
                             _x(peer.wall_s / mine.wall_s)])  # fmt: skip
                grown = max(1, mine.repo_growth)  # (packs, parity and metadata alike)
                rows.append([tool, f"{change} incr repo growth (peer / comb)",
                             _x(peer.repo_growth / grown)])  # fmt: skip
        rest = r.peer(tool, "restore")
        if rest is not None and r.restores:
            rows.append([tool, "restore MB/s (comb / peer)", _x(r.restores[0].mbps / rest.mbps)])
    return table("ratios against peers (> 1: comb better)", ["peer", "figure", "ratio"], rows, 2)


def _x(v: float) -> str:
    return f"{v:.2f}x"


def other_rows(r: Results) -> list[list[str]]:
    mem = r.memory()
    idx = r.extra["index"]
    peak, growth = mib(mem["local_peak_pss"] or 0), mib(mem["local_growth_pss"] or 0)
    rows = [
        ["local engine in the bench: peak PSS (its process) / growth", f"{peak} / {growth} MiB"]
    ]
    if r.command is not None:
        c = r.command
        rows.append(
            [
                "comb backup --engine local: wall / peak RSS (anonymous, files)",
                f"{c.wall_s:.2f} s / {mib(c.peak_rss)} MiB "
                f"({mib(c.peak_anon)}, {mib(c.peak_file)})",
            ]
        )
    ray = r.full.get("ray")
    if ray is not None and r.idle is not None:
        i = r.idle
        rows += [
            ["ray engine: start-up (engine.startup_s)", f"{ray.startup_s:.2f} s"],
            ["ray engine: run_backup wall - stats.seconds (mostly shutdown)",
             f"{ray.wall_s - ray.stats['seconds']:.2f} s"],
            ["bare ray.init / ray.shutdown / import ray",
             f"{i.init_s:.2f} / {i.shutdown_s:.2f} / {i.import_s:.2f} s"],
            ["idle local Ray PSS (above the driver)", f"{mib(i.ray_pss)} MiB"],
            ["ray engine: peak PSS all processes / above idle Ray",
             f"{mib(mem['ray_peak_pss'] or 0)} / {mib(mem['ray_above_idle'] or 0)} MiB"],
        ]  # fmt: skip
    per_chunk = idx["resident_bytes"] / max(1, idx["chunks"])
    res = f"{idx['resident_bytes']} / {idx['chunks']} = {per_chunk:.1f} B/chunk"
    rows.append(["dedup index: resident bytes / chunks", res])
    sparse = r.comb_incr(SPARSE, "list")
    if sparse is not None:
        s, f = sparse.stats, r.full[SPARSE].stats
        rows.append(["64 GiB sparse: full metadata / incr metadata (1000x4k)",
                     f"{f['metadata_bytes'] / 1024:.0f} / {s['metadata_bytes'] / 1024:.0f} KiB "
                     f"(leaves new {s['leaves_new']}, shared {s['leaves_shared']})"])  # fmt: skip
    return rows


def print_report(r: Results) -> list[Target]:
    print(_full_table(r))
    print(profile.profile_table([run for k, run in r.full.items() if k != SPARSE]))
    print(_incr_table(r))
    print(_restore_table(r))
    if r.peer_runs:
        print(_ratio_table(r))
    print(table("other figures", ["figure", "value"], other_rows(r)))
    found = targets(r)
    print(targets_table(found))
    return found


def to_json(r: Results, found: list[Target], env: dict[str, Any]) -> dict[str, Any]:
    return {
        "bench": "backup",
        "env": env,
        "size": r.size,
        "full": {k: v.to_json() for k, v in r.full.items()},
        "profile": {k: profile.to_json(v) for k, v in r.full.items() if v.cpu_by_stage},
        "incremental": {n: {k: v.to_json() for k, v in runs.items()} for n, runs in r.incr.items()},
        "changes": {k: asdict(v) for k, v in r.changes.items()},
        "restore": [x.to_json() for x in r.restores],
        "peers": [p.to_json() for p in r.peer_runs],
        "memory": r.memory(),
        "idle_ray": asdict(r.idle) if r.idle else None,
        "command": asdict(r.command) if r.command else None,
        "extra": r.extra,
        "targets": [t.to_json() for t in found],
        "load_avg_end": [round(x, 2) for x in load_average()],
    }
