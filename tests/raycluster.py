"""A real Ray cluster on this machine for the tests: a head and more nodes started with
``ray start`` (as Ray's own test suites run clusters), each node in a process group of its own
(``--block``) so a test stops exactly its own cluster, or kills one node's processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

# Ray's command line run by this interpreter: a venv's ``ray`` script runs the Python its
# shebang names, which is another venv's when the venv was copied, and comb only attaches to a
# Ray whose workers run this Python.
RAY_CLI = [sys.executable, "-m", "ray.scripts.scripts"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Cluster:
    address: str
    temp: str
    env: dict[str, str]
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def nodes(self) -> list[dict[str, Any]]:
        """What ``ray.nodes()`` says, asked by a driver of its own."""
        code = "import json, ray; ray.init(); print(json.dumps(ray.nodes()))"
        env = {**self.env, "RAY_ADDRESS": self.address}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env=env, timeout=120, check=True)  # fmt: skip
        return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def stop_group(proc: subprocess.Popen[bytes]) -> None:
    """Stop a ``ray start --block`` and everything it started (its process group)."""
    for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 30)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait_s)
            return
        except (ProcessLookupError, subprocess.TimeoutExpired):
            continue


def _wait(cluster: Cluster, nodes: int) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        for i, p in enumerate(cluster.procs):
            if p.poll() is not None:
                log = open(os.path.join(cluster.temp, f"node{i}.log")).read()  # noqa: SIM115
                raise AssertionError(f"ray start of node {i} exited: {log[-2000:]}")
        try:
            if sum(1 for n in cluster.nodes() if n["Alive"]) >= nodes:
                return
        except (subprocess.SubprocessError, ValueError, IndexError):
            pass
        time.sleep(1)
    raise AssertionError(f"the Ray cluster did not reach {nodes} nodes within 180 s")


@contextmanager
def ray_cluster(resources: list[dict[str, float]], cpus: int = 1) -> Iterator[Cluster]:
    """A head (``resources[0]``) and one more node per further entry, ``cpus`` CPUs each."""
    port = free_port()
    temp = tempfile.mkdtemp(prefix="combray", dir="/tmp")  # AF_UNIX paths are short
    # A test cluster without token authentication (Ray 2.60 enables it by default).
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    cluster = Cluster(f"127.0.0.1:{port}", temp, env)
    common = ["--block", f"--num-cpus={cpus}", "--node-ip-address=127.0.0.1",
              "--object-store-memory=100000000", "--disable-usage-stats"]  # fmt: skip
    try:
        for i, res in enumerate(resources):
            head = [
                "--head",
                f"--port={port}",
                "--include-dashboard=false",
                f"--temp-dir={temp}/ray",
            ]
            role = head if i == 0 else [f"--address={cluster.address}"]
            with open(os.path.join(temp, f"node{i}.log"), "wb") as log:
                cluster.procs.append(subprocess.Popen(
                    [*RAY_CLI, "start", *role, *common, f"--resources={json.dumps(res)}"],
                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env,
                ))  # fmt: skip
            _wait(cluster, i + 1)  # (one node at a time: two joining at once can collide)
        yield cluster
    finally:
        for proc in reversed(cluster.procs):
            stop_group(proc)
        shutil.rmtree(temp, ignore_errors=True)
