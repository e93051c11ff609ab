"""Placement on a Ray cluster (a job file's ``node``, ``pipeline.ray_placement``): the nodes a
placement names; a source placed on a node is read there and its point says so (``read_on``,
in ``points --json`` and the ``points`` view); a placement naming no node fails its sources
alone; placement needs the ray engine. The multi-node cluster test is in
tests/pipeline/test_cluster_placement.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from combtest import CliRunner, ImageFactory, MiB

from pipeline.engines import _by_cpus
from pipeline.ray_actors import ray_module
from pipeline.ray_placement import matching_nodes

NODES = [
    {"NodeID": "aa", "Alive": True, "NodeManagerAddress": "10.0.0.1", "NodeName": "head",
     "Resources": {"CPU": 2.0, "storage-1": 1.0}, "Labels": {"rack": "r1"}},
    {"NodeID": "bb", "Alive": True, "NodeManagerAddress": "10.0.0.2", "NodeName": "b",
     "Resources": {"CPU": 4.0}, "Labels": {"rack": "r2"}},
    {"NodeID": "cc", "Alive": False, "NodeManagerAddress": "10.0.0.3", "NodeName": "c",
     "Resources": {"CPU": 4.0, "storage-1": 1.0}, "Labels": {"rack": "r1"}},
]  # fmt: skip


@pytest.mark.parametrize(
    ("placement", "ids"),
    [("bb", ["bb"]), ("10.0.0.1", ["aa"]), ("b", ["bb"]), ("storage-1", ["aa"]),
     ("rack=r1", ["aa"]), ("rack=r3", []), ("10.0.0.3", []), ("nowhere", []),
     ("CPU", ["aa", "bb"])],
)  # fmt: skip
def test_a_placement_names_alive_nodes(placement: str, ids: list[str]) -> None:
    assert [n["NodeID"] for n in matching_nodes(NODES, placement)] == ids


def test_workers_anywhere_go_to_the_nodes_by_their_cpus() -> None:
    """0-CPU actors ignore CPUs: the engine hands them out itself, each node as many as it has
    CPUs, interleaved (a dead node none)."""
    assert _by_cpus(NODES) == ["aa", "bb", "aa", "bb", "bb", "bb"]


def test_placement_needs_ray_and_a_name(cli: CliRunner, repo_path: Path, tmp_path: Path) -> None:
    job = tmp_path / "jobs.toml"
    job.write_text('[[source]]\npath = "a.img"\nnode = "storage-1"\n')
    res = cli("-r", repo_path, "job", "run", job, "--engine", "local")
    assert res.code == 2
    assert res.err == (
        f"comb: error: job file {job}: source {str(tmp_path / 'a.img')!r} is placed on node "
        "'storage-1'; placement needs the ray engine\n"
    )
    job.write_text('[[source]]\npath = "a.img"\n\nnode = 3\n')
    res = cli("-r", repo_path, "job", "run", job, "--engine", "ray")
    assert res.code == 2 and "line 4: `source.node` must be a non-empty string" in res.err


@pytest.mark.ray
def test_a_placed_source_is_read_there_and_one_placed_nowhere_fails_alone(
    cli: CliRunner, make_image: ImageFactory, tmp_path: Path, repo_path: Path
) -> None:
    make_image(2 * MiB, "a.img").random(0, 2 * MiB, seed=1)
    make_image(2 * MiB, "b.img").random(0, 2 * MiB, seed=2)
    make_image(MiB, "c.img").random(0, MiB, seed=3)
    ip = ray_module().util.get_node_ip_address()  # (the address the embedded node will have)
    job = tmp_path / "jobs.toml"
    job.write_text(
        f'[[source]]\npath = "a.img"\nnode = "{ip}"\n'
        '[[source]]\npath = "b.img"\n'
        '[[source]]\npath = "c.img"\nnode = "nowhere"\n'
    )
    res = cli("-r", repo_path, "job", "run", job, "--engine", "ray", "--workers", "1", "--json")
    assert res.code == 5, res.err
    rows = {Path(d["path"]).name: d for d in json.loads(res.out)["sources"]}
    assert rows["a.img"]["status"] == rows["b.img"]["status"] == "backed up"
    assert rows["c.img"]["status"] == "failed"
    assert rows["c.img"]["error"].startswith("no alive Ray node is 'nowhere'")
    points = {
        Path(p["source"]).name: p
        for p in json.loads(cli("-r", repo_path, "points", "--json").out)["points"]
    }
    (node,) = points["a.img"]["read_on"]
    assert node["address"] == ip and len(node["node_id"]) == 56
    assert points["b.img"]["read_on"] == [node]  # (one node: everything is read there)
    res = cli("-r", repo_path, "query", "SELECT source, read_on[1].address AS address FROM points "
              "ORDER BY source", "--json")  # fmt: skip
    assert res.code == 0, res.err
    assert {r["address"] for r in json.loads(res.out)["rows"]} == {ip}
    for name in ("a.img", "b.img"):
        out = tmp_path / f"out-{name}"
        assert cli("-r", repo_path, "restore", points[name]["id"], out).code == 0
        assert out.read_bytes() == (tmp_path / name).read_bytes()
    # the local engine's points say nothing of nodes
    res = cli("-r", repo_path, "backup", tmp_path / "c.img", "--engine", "local", "--json")
    assert json.loads(res.out)["read_on"] == []
