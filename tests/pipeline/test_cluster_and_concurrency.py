"""Two backups into one repository at once; the same job on an existing Ray cluster."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from raycluster import RAY_CLI, free_port, stop_group
from s3server import S3Server

COMB = [sys.executable, "-m", "pipeline.cli"]
ROOT = Path(__file__).resolve().parents[2]


def _image(path: Path, seed: int, size: int = 24 << 20) -> None:
    rng = __import__("random").Random(seed)
    with open(path, "wb") as fh:
        fh.truncate(size)
        for _ in range(40):
            fh.seek(rng.randrange(0, size - 300_000))
            fh.write(rng.randbytes(rng.randrange(1, 300_000)))


def _comb(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*COMB, *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300
    )


def test_two_sources_back_up_at_the_same_time(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    assert _comb("-r", str(repo), "init").returncode == 0
    images = [tmp_path / "a.img", tmp_path / "b.img"]
    for seed, img in enumerate(images):
        _image(img, seed)
    # Both share some data, so both may try to store the same chunks concurrently.
    with open(images[1], "r+b") as dst, open(images[0], "rb") as src:
        dst.seek(0)
        dst.write(src.read(4 << 20))
    procs = [
        subprocess.Popen(
            [*COMB, "-r", str(repo), "backup", str(img), "--engine", "local", "--batch-mib", "1"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for img in images
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    for img in images:
        restored = tmp_path / f"{img.name}.restored"
        r = _comb("-r", str(repo), "restore", f"{img}@latest", str(restored))
        assert r.returncode == 0, r.stderr
        assert restored.read_bytes() == img.read_bytes()
    v = _comb("-r", str(repo), "verify", "--read-data")
    assert v.returncode == 0, v.stderr
    assert "2 point(s)" in v.stdout


def _wait_for_cluster(address: str, proc: subprocess.Popen[bytes], env: dict[str, str]) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, "ray start --head exited early"
        status = subprocess.run(
            [*RAY_CLI, "status", f"--address={address}"], capture_output=True, timeout=60, env=env
        )
        if status.returncode == 0:
            return
        time.sleep(1)
    raise AssertionError("the Ray cluster did not come up within 120 s")


@pytest.mark.ray
def test_backup_on_an_existing_ray_cluster(tmp_path: Path, s3_server: S3Server) -> None:
    address = f"127.0.0.1:{free_port()}"
    temp = tempfile.mkdtemp(prefix="combray", dir="/tmp")  # AF_UNIX paths are short
    # A test cluster without token authentication (Ray 2.60 enables it by default; a real
    # cluster's token reaches comb through RAY_AUTH_TOKEN like any other Ray client).
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)  # (the tests' default, "local", would keep comb off it)
    # --block keeps the cluster's processes in this process group, so the test stops exactly
    # its own cluster (``ray stop`` would stop every cluster on the machine).
    head = subprocess.Popen(
        [
            *RAY_CLI, "start", "--head", "--block", f"--port={address.split(':')[1]}",
            "--num-cpus=2", "--include-dashboard=false", "--node-ip-address=127.0.0.1",
            f"--temp-dir={temp}/ray", "--object-store-memory=100000000", "--disable-usage-stats",
        ],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=env,
        umask=0,  # as on machines whose umask is 0: Ray's address file is then writable by all
    )  # fmt: skip
    try:
        _wait_for_cluster(address, head, env)
        repo, img = tmp_path / "repo", tmp_path / "disk.img"
        _image(img, 7)
        assert _comb("-r", str(repo), "init").returncode == 0
        # No address given: comb finds the Ray `ray start` runs on this machine (the address
        # file it wrote under RAY_TMPDIR, and its GCS answering) and says it used it.
        # `ray start` writes its address file once the node is up (after `ray status` answers);
        # under umask 0 it is writable by all, and comb uses it all the same.
        address_file = Path(temp, "ray", "ray_current_cluster")
        deadline = time.monotonic() + 60
        while not address_file.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert address_file.stat().st_mode & 0o002
        found = {**env, "RAY_TMPDIR": temp}
        r = _comb("-r", str(repo), "backup", str(img), "--engine", "ray", "--json", env=found)
        assert r.returncode == 0, r.stderr
        # (the address file names the node's own address, whatever --node-ip-address says)
        port = address.split(":")[1]
        assert re.search(rf"used the Ray running here at [0-9.]+:{port} ", r.stderr), r.stderr
        _image(img, 8)
        # Named by address, into a repository on S3: the cluster's workers were started
        # without the AWS variables; comb hands them to its actors.
        s3 = {**env, **s3_server.env(), "RAY_ADDRESS": address}
        bucket = f"s3://{s3_server.bucket()}/on-cluster"
        assert _comb("-r", bucket, "init", env=s3).returncode == 0
        r = _comb("-r", bucket, "backup", str(img), "--engine", "ray", "--json", env=s3)
        assert r.returncode == 0, r.stderr
        assert '"engine": "ray"' in r.stdout and "used the Ray running here" not in r.stderr
        out = tmp_path / "out.img"
        assert _comb("-r", bucket, "restore", f"{img}@latest", str(out), env=s3).returncode == 0
        assert out.read_bytes() == img.read_bytes()
        # comb must not have shut down the user's cluster.
        status = subprocess.run(
            [*RAY_CLI, "status", f"--address={address}"], capture_output=True, timeout=60, env=env
        )
        assert status.returncode == 0
    finally:
        stop_group(head)
        shutil.rmtree(temp, ignore_errors=True)
