"""A job on a real multi-node Ray cluster (a head and two nodes started with ``ray start`` on this
machine, each with a resource of its own): a source placed on a node is read only there, the
others spread over the nodes' workers, and each point records the nodes that read it; every
point restores identical."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from combtest import CliRunner, ImageFactory, MiB
from raycluster import ray_cluster

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.ray
def test_sources_placed_on_nodes_are_read_there(
    cli: CliRunner, make_image: ImageFactory, tmp_path: Path, repo_path: Path
) -> None:
    for i, name in enumerate(("one.img", "two.img", "any1.img", "any2.img")):
        make_image(8 * MiB, name).random(0, 8 * MiB, seed=i)
    job = tmp_path / "jobs.toml"
    job.write_text(
        '[[source]]\npath = "one.img"\nnode = "disk-one"\n'
        '[[source]]\npath = "two.img"\nnode = "disk-two"\n'
        '[[source]]\npath = "any1.img"\n[[source]]\npath = "any2.img"\n'
    )
    with ray_cluster([{"head": 1}, {"disk-one": 1}, {"disk-two": 1}]) as cluster:
        nodes = cluster.nodes()
        by_resource = {
            res: n["NodeID"] for n in nodes for res in ("head", "disk-one", "disk-two")
            if n["Resources"].get(res)
        }  # fmt: skip
        address = {n["NodeID"]: n["NodeManagerAddress"] for n in nodes}
        # A comb process of its own, as a user runs it (this one may hold another Ray's state)
        env = {**cluster.env, "RAY_ADDRESS": cluster.address, "PYTHONPATH": str(ROOT),
               "COMB_STATE_DIR": str(tmp_path / "state")}  # fmt: skip
        run = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", "-r", str(repo_path), "job", "run", str(job),
             "--engine", "ray", "--batch-mib", "1", "--json"],
            capture_output=True, text=True, env=env, timeout=600,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr
    points = {
        os.path.basename(p["source"]): p
        for p in json.loads(cli("-r", repo_path, "points", "--json").out)["points"]
    }
    read_on = {name: {n["node_id"] for n in p["read_on"]} for name, p in points.items()}
    assert read_on["one.img"] == {by_resource["disk-one"]}
    assert read_on["two.img"] == {by_resource["disk-two"]}
    # the others went to the workers spread over the cluster: three nodes, one CPU each
    spread = read_on["any1.img"] | read_on["any2.img"]
    assert spread <= set(by_resource.values()) and len(spread) >= 2
    assert all(n["address"] == address[n["node_id"]] for p in points.values() for n in p["read_on"])
    for name, p in points.items():
        out = tmp_path / f"out-{name}"
        assert cli("-r", repo_path, "restore", p["id"], out).code == 0
        assert out.read_bytes() == (tmp_path / name).read_bytes()
