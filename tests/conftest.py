"""Fixtures: a repository, an image factory, the CLI run in-process, the vSphere simulator and
an S3 server."""

from __future__ import annotations

import itertools
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from combtest import (  # noqa: E402
    TEST_PASSWORD,  # noqa: E402
    CliResult,
    CliRunner,
    Image,
    ImageFactory,
)
from pyVmomi import vim  # noqa: E402
from s3server import S3Server, moto_server  # noqa: E402
from vcsimtest import (  # noqa: E402
    CBT_PAGE_BYTES,
    Simulator,
    VmFactory,
    VmInfo,
    build,
    create_vm,
    need_go,
)

from catalog.repo import Repository  # noqa: E402
from pipeline.cli import main  # noqa: E402

# Module- and session-scoped fixtures make repositories before the autouse fixture below runs.
os.environ["COMB_PASSWORD"] = TEST_PASSWORD


@pytest.fixture(autouse=True)
def _comb_env(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Local engine unless a test says otherwise; no repository, cluster or configuration file
    from outside (a developer's own ~/.config/comb/config.toml included)."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path_factory.getbasetemp() / "no-config"))
    # Job state (``job run``, ``job serve``) in the test's own folder, never ~/.local/state.
    monkeypatch.setenv("COMB_STATE_DIR", str(tmp_path_factory.mktemp("state")))
    monkeypatch.delenv("COMB_CONFIG", raising=False)
    monkeypatch.setenv("COMB_ENGINE", "local")
    # Repositories are encrypted by default: every test runs with the same password unless
    # it says otherwise (tests/pipeline/test_encryption*.py cover the password paths). Only
    # the CLI reads this variable; library calls pass TEST_PASSWORD themselves.
    monkeypatch.setenv("COMB_PASSWORD", TEST_PASSWORD)
    for var in ("COMB_PASSWORD_FILE", "COMB_NEW_PASSWORD", "COMB_NEW_PASSWORD_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("COMB_REPO", raising=False)
    # comb's own Ray, never one a developer's `ray start` runs (tests that want one say so)
    monkeypatch.setenv("RAY_ADDRESS", "local")


@pytest.fixture
def repo_path(tmp_path: Path) -> Path:
    path = tmp_path / "repo"
    Repository.init(str(path), password=TEST_PASSWORD)
    return path


@pytest.fixture
def repo(repo_path: Path) -> Repository:
    return Repository.open(str(repo_path), password=TEST_PASSWORD)


@pytest.fixture
def make_image(tmp_path: Path) -> ImageFactory:
    counter = iter(range(1_000_000))

    def make(size: int, name: str | None = None) -> Image:
        return Image(tmp_path / (name or f"disk{next(counter)}.img"), size)

    return make


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> CliRunner:
    """Run ``comb`` in this process through ``pipeline.cli.main``; returns (code, out, err)."""

    def run(*args: object) -> CliResult:
        capsys.readouterr()
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return CliResult(code, out, err)

    return run


@pytest.fixture
def history(tmp_path: Path) -> tuple[object, ...]:
    """Four real backups with known changes (catalogtest.make_history): the analytics tests'
    history."""
    from catalogtest import make_history

    return make_history(tmp_path)


# -- the vSphere simulator (tests/vcsim, tests/vsphere) ---------------------------------


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """moto's S3 server, one process for the session (tests/s3server.py)."""
    with moto_server() as server:
        yield server


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """The AWS variables of the session's S3 server set for this test (comb reads them)."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return s3_server


@pytest.fixture(scope="session")
def vcsim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Simulator]:
    """The simulator (built once), with TLS, a login and CBT answers of at most 1 MiB."""
    need_go()
    binary = build()
    workdir: Path = tmp_path_factory.mktemp("vcsim")
    with Simulator(workdir, binary=binary, cbt_page_bytes=CBT_PAGE_BYTES) as sim:
        yield sim


@pytest.fixture(scope="session")
def vcsim_si(vcsim: Simulator) -> Iterator[vim.ServiceInstance]:
    """A logged-in pyvmomi connection shared by the session."""
    si = vcsim.connect()
    yield si
    Simulator.disconnect(si)


_names = itertools.count()


@pytest.fixture
def make_vm(
    request: pytest.FixtureRequest, vcsim: Simulator, vcsim_si: vim.ServiceInstance
) -> Iterator[VmFactory]:
    """make_vm(disk_sizes, hw_version=..., cbt=..., power_on=...) -> a VM with a unique name.

    Fault hooks are cleared after the test."""
    base = re.sub(r"[^A-Za-z0-9_-]", "_", request.node.name)[:40]

    def make(disk_sizes: list[int], **kwargs: object) -> VmInfo:
        return create_vm(vcsim_si, f"{base}-{next(_names)}", disk_sizes, **kwargs)  # type: ignore[arg-type]

    yield make
    vcsim.clear_hooks()
