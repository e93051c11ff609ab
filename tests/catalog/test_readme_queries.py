"""README.md's query examples run as printed: every ``comb -r REPO query "..."`` line of its
``sh`` blocks, and every inline `` `query "SELECT ..."` ``, against a repository the CLI made,
so that an example that fails, prints nothing, or gives a float where it promises whole
numbers (``2^30`` is a DOUBLE in DuckDB) fails the tests."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from combtest import CliRunner, Image, KiB

README = Path(__file__).resolve().parents[2] / "README.md"
GiB = 1 << 30


def readme_queries(text: str) -> list[list[str]]:
    """Each example's arguments after ``comb``, in README order (``REPO`` as written)."""
    out = []
    for block in re.findall(r"^```sh\n(.*?)^```", text, re.M | re.S):
        for line in block.replace("\\\n", " ").splitlines():  # continued lines joined
            if line.startswith("comb ") and " query " in line:
                out.append(shlex.split(line, comments=True)[1:])
    for sql in re.findall(r'`query "(SELECT[^"`]*)"`', text):
        out.append(["-r", "REPO", "query", " ".join(sql.split())])  # may wrap in the prose
    return out


def test_the_readme_has_query_examples() -> None:
    examples = readme_queries(README.read_text(encoding="utf-8"))
    assert len(examples) >= 4, examples
    assert all(args[:3] == ["-r", "REPO", "query"] for args in examples), examples


def _integer_like(field: pa.Field) -> bool:
    t = field.type
    return pa.types.is_integer(t) or (pa.types.is_decimal(t) and t.scale == 0)


def _sane(field: pa.Field) -> bool:
    """Whole numbers for counts and sizes; only a ratio may be a float."""
    if pa.types.is_floating(field.type) or pa.types.is_decimal(field.type):
        return _integer_like(field) or "ratio" in field.name
    return True


def _table_columns(lines: list[str]) -> list[list[str]]:
    """The cells of each column of ``query``'s table output (columns start where their
    left-aligned heading does; a value may hold single spaces, e.g. a time)."""
    starts = [m.start() for m in re.finditer(r"(?:^|(?<=  ))\S", lines[0])]
    bounds = list(zip(starts, [*starts[1:], None], strict=True))
    return [[row[a:b].strip() for row in lines[1:]] for a, b in bounds]


def test_every_readme_query_runs(
    cli: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # an example's --output FILE lands here
    repo = tmp_path / "repo"
    assert cli("-r", repo, "init").code == 0
    disk = Image(tmp_path / "disk.img", 3 * GiB)  # sparse: a backup reads only the data
    disk.random(0, 1 << 20)
    assert cli("-r", repo, "backup", disk.path).code == 0
    disk.random(64 * KiB, 64 * KiB, seed=1)  # in the first GiB
    disk.random(2 * GiB, 128 * KiB, seed=2)  # in the third
    assert cli("-r", repo, "backup", disk.path).code == 0
    for args in readme_queries(README.read_text(encoding="utf-8")):
        argv = [str(repo) if a == "REPO" else a for a in args]
        res = cli(*argv)
        assert res.code == 0 and res.err == "", (args, res.err)
        if "--output" in argv:
            result = pq.read_table(argv[argv.index("--output") + 1])
        else:  # the same query as Parquet, for its column types
            lines = res.out.splitlines()
            assert len(lines) >= 2, (args, res.out)  # a header and at least one row
            assert cli(*argv, "--format", "parquet", "--output", "types.parquet").code == 0
            result = pq.read_table("types.parquet")
            assert result.num_rows == len(lines) - 1, (args, res.out)
            for name, cells in zip(result.column_names, _table_columns(lines), strict=True):
                if _integer_like(result.schema.field(name)):  # printed as whole numbers
                    assert all(re.fullmatch(r"-?\d+", c) for c in cells), (args, name, cells)
        assert result.num_rows > 0 and all(_sane(f) for f in result.schema), (args, result.schema)
        if "gib" in result.column_names:  # "what changed in the latest point, per GiB of disk"
            assert result.select(["gib", "changed"]).to_pylist() == [
                {"gib": 0, "changed": 64 * KiB},
                {"gib": 2, "changed": 128 * KiB},
            ], args


def test_a_double_is_not_a_whole_number() -> None:
    """What the check above catches: ``x // 2^30`` is a DOUBLE (0.00122... for offset 1 MiB)."""
    assert not _sane(pa.field("gib", pa.float64()))
    assert _sane(pa.field("changed", pa.decimal128(38, 0)))  # sum() of BIGINT: a HUGEINT
    assert _sane(pa.field("dedup_ratio", pa.float64()))
