"""Writing result tables (``query``, ``report``): to the terminal as a table, or as CSV, JSON or
Parquet, to standard output or atomically to a file (a temporary name in the same directory,
renamed when complete, so a failed or interrupted write never leaves a partial file under the
name asked for). JSON is one object whose ``rows`` list streams one row per line, with values
as JSON types (a DuckDB HUGEINT, e.g. a ``sum()``, is a number: ``console.json_value``)."""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import IO, Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from catalog.errors import OutputError, QueryError, UsageError

from ..console import human_bytes, json_value, table_row


def add_output_options(s: argparse.ArgumentParser, with_parquet: bool) -> None:
    formats = ["table", "csv", "json", *(["parquet"] if with_parquet else [])]
    s.add_argument(
        "--format",
        choices=formats,
        default=None,
        help="table (default), csv, json (the same as --json)"
        + (" or parquet (with --output)" if with_parquet else ""),
    )
    s.add_argument("--output", metavar="FILE", help="write the result to FILE (atomically)")


def output_format(args: argparse.Namespace) -> str:
    """``--format``, or ``json`` for ``--json``; ``table`` when neither is given."""
    if args.json and args.format not in (None, "json"):
        raise UsageError(f"--json and --format {args.format} contradict each other")
    return "json" if args.json else args.format or "table"


def write_result(
    reader: pa.RecordBatchReader,
    fmt: str,
    output: str | None,
    human: bool = False,
    head: dict[str, Any] | None = None,
) -> None:
    """Write every batch of ``reader`` in ``fmt``; ``human`` shows sizes and times readably in
    the table format (reports), raw values otherwise (queries, CSV, JSON, Parquet). ``head``:
    more fields of the JSON object, before ``columns`` and ``rows``."""
    if fmt == "parquet" and output is None:
        raise UsageError("--format parquet needs --output FILE")
    try:
        with open_output(output, binary=fmt == "parquet") as out:
            if fmt == "parquet":
                _parquet(reader, out)
            else:
                _text(reader, fmt, out, human, head or {})  # type: ignore[arg-type]
    except (duckdb.Error, pa.ArrowException) as err:
        raise QueryError(f"query failed: {str(err).splitlines()[0]}") from None


@contextmanager
def open_output(output: str | None, binary: bool) -> Iterator[IO[Any]]:
    """Standard output, or ``output`` written under a temporary name and renamed when done."""
    if output is None:
        yield sys.stdout.buffer if binary else sys.stdout
        return
    folder = os.path.dirname(os.path.abspath(output))
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(output)}.", dir=folder)
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # as an ordinary new file (mkstemp makes it 0600)
    except OSError as err:
        raise OutputError(f"cannot write {output}: {err.strerror}") from None
    try:
        with os.fdopen(fd, "wb" if binary else "w", encoding=None if binary else "utf-8") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, output)
        _sync_dir(folder)
    except OSError as err:
        _remove(tmp)
        raise OutputError(f"cannot write {output}: {err.strerror}") from None
    except BaseException:
        _remove(tmp)
        raise


def _sync_dir(folder: str) -> None:
    """Make the rename durable (as restore does for its output)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _parquet(reader: pa.RecordBatchReader, out: IO[bytes]) -> None:
    with pq.ParquetWriter(out, reader.schema, compression="zstd") as writer:
        for batch in reader:
            writer.write_batch(batch)


def _text(
    reader: pa.RecordBatchReader, fmt: str, out: IO[str], human: bool, head: dict[str, Any]
) -> None:
    """Batch by batch, so memory stays bounded whatever the result's size."""
    names = reader.schema.names
    widths: list[int] | None = None
    first = True
    if fmt == "json":
        fields = {**head, "columns": names}
        out.write("{" + "".join(f"{json.dumps(k)}: {_json(v)}, " for k, v in fields.items()))
        out.write('"rows": [')
    elif fmt == "csv":
        csv.writer(out).writerow(names)
    for batch in reader:
        rows = batch.to_pylist()
        if fmt == "json":
            for row in rows:
                out.write(("\n" if first else ",\n") + _json(row))
                first = False
        elif fmt == "csv":
            csv.writer(out).writerows([[_cell(v) for v in r.values()] for r in rows])
        else:
            cells = [[_shown(k, v, human) for k, v in r.items()] for r in rows]
            if widths is None:
                widths = [max([len(h), *(len(x[i]) for x in cells)]) for i, h in enumerate(names)]
                out.write(_line(names, widths))
            for x in cells:
                out.write(_line(x, widths))
    if fmt == "json":
        out.write("\n]}\n" if not first else "]}\n")
    elif fmt == "table" and widths is None:
        out.write("  ".join(names) + "\n")


def _line(values: list[str], widths: list[int]) -> str:
    return table_row(values, widths) + "\n"


def _json(v: Any) -> str:
    """Strict JSON: a row's NaN or infinity (DuckDB has them, JSON does not) is ``null``."""
    if isinstance(v, dict):
        v = {k: None if isinstance(x, float) and not math.isfinite(x) else x for k, x in v.items()}
    return json.dumps(v, default=json_value, allow_nan=False)


def _cell(v: Any) -> str:
    if isinstance(v, bytes):
        return v.hex()
    if v is None:
        return ""
    # One row per line, whatever the data holds (source names may contain newlines).
    return str(v).replace("\n", "\\n").replace("\r", "\\r")


def _shown(name: str, v: Any, human: bool) -> str:
    if not human or v is None:
        return _cell(v)
    sized = "bytes" in name or name.endswith("offset")
    if isinstance(v, int | float) and not isinstance(v, bool) and sized:
        return human_bytes(v) + ("/h" if name.endswith("per_hour") else "")
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, datetime):
        return v.strftime("%Y-%m-%d %H:%M:%S")
    return _cell(v)
